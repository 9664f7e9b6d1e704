"""Typed field readers for OpenAI request bodies. Each raises ApiError naming the field."""

from __future__ import annotations

from typing import Any

from services.runtime.errors import ApiError

_MISSING = object()
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what the wire (msgpack) carries; no field needs more


def is_token_id(value: Any) -> bool:
    """A non-negative integer the wire can carry (the worker checks it against the vocabulary)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


def _type_error(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(f"'{name}' must be {expected}, got {type(value).__name__}", code="invalid_type", param=name)


def value_error(name: str, message: str) -> ApiError:
    return ApiError(message, code="invalid_value", param=name)


def get_int(body: dict, name: str, default: int | None = None, *, minimum: int | None = None,
            maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise value_error(name, f"'{name}' must be a 64-bit integer, got {value}")
    if minimum is not None and value < minimum:
        raise value_error(name, f"'{name}' must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise value_error(name, f"'{name}' must be at most {maximum}, got {value}")
    return value


def get_float(body: dict, name: str, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def get_dict(body: dict, name: str) -> dict | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _type_error(name, "an object", value)
    return value


def get_stop(body: dict, max_sequences: int) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error("stop", "a string or a list of strings", value)
    if len(value) > max_sequences:
        raise value_error("stop", f"'stop' allows at most {max_sequences} sequences, got {len(value)}")
    if any(not s for s in value):
        raise value_error("stop", "'stop' sequences must be non-empty")
    return tuple(value)


def reject_unsupported(body: dict, fields: dict[str, Any]) -> None:
    """400 for features we do not implement, unless the value is the no-op default."""
    for name, neutral in fields.items():
        value = body.get(name)
        if value is not None and value != neutral:
            raise ApiError(f"'{name}' is not supported by this server", code="unsupported_parameter", param=name)
