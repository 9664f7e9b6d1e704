"""Reading request bodies the same way in every service: size cap, strict UTF-8, JSON object."""

from __future__ import annotations

import json
import re

from aiohttp import web

from services.runtime.errors import ApiError
from services.runtime.wire import WireDecodeError, decode


async def read_json_object(request: web.Request) -> dict:
    body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413 via middleware
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from e
    try:
        obj = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise ApiError(f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(obj, dict):
        raise ApiError("request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text):
        _check_no_lone_surrogates(obj)
    return obj


# JSON's \uD800-\uDFFF escapes: a pair is one character, a lone one no character at all (it
# cannot be encoded as UTF-8 further on, e.g. into the message a worker gets).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_no_lone_surrogates(obj: dict) -> None:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError("request body is not valid JSON text: it escapes an unpaired UTF-16 surrogate (\\uD800-\\uDFFF)",
                       code="invalid_json") from None


def _not_json(name: str):
    # Python's json reads NaN and Infinity; JSON has neither, and a NaN temperature would pass
    # every range check (all comparisons are false) and poison the sampler.
    raise ApiError(f"request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


async def read_message(request: web.Request, expected: type):
    """A msgpack cluster message of the expected type, or a 400 naming what was wrong."""
    try:
        return decode(await request.read(), expected)
    except WireDecodeError as e:
        raise ApiError(f"bad {expected.__name__}: {e}", code="wire_decode_error") from e


def json_response(payload: dict, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload, separators=(",", ":")).encode(), content_type="application/json"
    )
