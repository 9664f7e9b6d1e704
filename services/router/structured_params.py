"""OpenAI's response_format and vLLM's structured_outputs (and its older guided_* fields) -> the
engine's StructuredOutput wire form. Only shapes are checked here: the worker compiles the grammar.
Pure: no I/O, no model."""

from __future__ import annotations

import json
from typing import Any

from services.router.params import value_error
from services.runtime.errors import ApiError

_STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                    "json_object": "json_object"}


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_output(body: dict) -> dict | None:
    """OpenAI's response_format or vLLM's structured_outputs (or its older guided_* fields) -> the
    engine's StructuredOutput wire form ({kind, spec, choices, param}), or None for free text. Only
    shapes are checked here: the worker compiles the grammar and names what does not compile."""
    given = [name for name in ("response_format", "structured_outputs", *_GUIDED) if body.get(name) is not None]
    if len(given) > 1:
        raise value_error(given[1], f"set one of {given}, not several: each constrains the whole output")
    if not given:
        return None
    name = given[0]
    if name == "response_format":
        return _response_format(body[name])
    if name == "structured_outputs":
        return _structured_outputs(body[name])
    # vLLM's older spelling: guided_json: {...} is structured_outputs: {"json": {...}}
    return _structured_outputs({_GUIDED[name]: body[name]}, param=name)


def _response_format(fmt: Any) -> dict | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ApiError("'response_format' must be an object with a 'type'", code="invalid_type",
                       param="response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"kind": "json_object", "spec": "", "choices": [], "param": "response_format"}
    if kind != "json_schema":
        raise value_error("response_format.type", "'response_format.type' must be one of 'text', 'json_object', "
                                                  f"'json_schema', got {kind!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError("'response_format.json_schema' must be an object whose 'schema' is a JSON schema object",
                       code="invalid_type", param="response_format.json_schema")
    return {"kind": "json_schema", "spec": json.dumps(spec["schema"]), "choices": [], "param": "response_format"}


def _structured_outputs(outputs: Any, param: str = "structured_outputs") -> dict:
    legacy = param != "structured_outputs"  # guided_json etc.: the field itself is named in errors
    if not isinstance(outputs, dict):
        raise ApiError("'structured_outputs' must be an object", code="invalid_type", param=param)
    unknown = sorted(set(outputs) - set(_STRUCTURED_KEYS))
    if unknown:
        raise value_error(param, f"'structured_outputs' does not support {unknown}; "
                                 f"set one of {sorted(_STRUCTURED_KEYS)}")
    given = [k for k in _STRUCTURED_KEYS if outputs.get(k) not in (None, False)]
    if len(given) != 1:
        raise value_error(param, f"'structured_outputs' must set exactly one of {sorted(_STRUCTURED_KEYS)}, "
                                 f"got {given or 'none'}")
    key = given[0]
    value = outputs[key]
    sub = param if legacy else f"{param}.{key}"  # the field named in errors
    out = {"kind": _STRUCTURED_KEYS[key], "spec": "", "choices": [], "param": param}
    if key == "json":  # a schema object, or its JSON text
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise value_error(sub, f"'{sub}' is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ApiError(f"'{sub}' must be a JSON schema object", code="invalid_type", param=sub)
        out["spec"] = json.dumps(value)
    elif key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ApiError(f"'{sub}' must be a non-empty list of non-empty strings", code="invalid_type", param=sub)
        out["choices"] = value
    elif key == "json_object":
        if value is not True:
            raise ApiError(f"'{sub}' must be true", code="invalid_type", param=sub)
    else:
        if not isinstance(value, str) or not value:
            raise ApiError(f"'{sub}' must be a non-empty string", code="invalid_type", param=sub)
        out["spec"] = value
    return out
