"""CORS for the public API, so a page in a browser can call it directly. vLLM allows every origin by
default (FastAPI's CORSMiddleware with allow_origins ["*"]); so does the router, and
--allowed-origins narrows it.

A preflight (OPTIONS with Access-Control-Request-Method) is answered here, before routing and
before the API key check (browsers send no credentials with it). Other responses get their
Access-Control-Allow-Origin in on_response_prepare: a streamed answer's headers go out before the
handler returns, too late for a middleware.
"""

from __future__ import annotations

import json

from aiohttp import web

ANY = "*"
_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"


def parse_origins(values: list[str] | None) -> tuple[str, ...]:
    """--allowed-origins: repeatable, each an origin, a comma list, or vLLM's JSON list; default any."""
    if not values:
        return (ANY,)
    origins: list[str] = []
    for value in values:
        if value.lstrip().startswith("["):
            try:
                items = json.loads(value)
            except ValueError as e:
                raise ValueError(f"--allowed-origins {value!r} is not a JSON list: {e}") from None
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ValueError(f"--allowed-origins {value!r} must be a JSON list of strings")
        else:
            items = value.split(",")
        origins += [x.strip() for x in items if x.strip()]
    if not origins:
        raise ValueError("--allowed-origins names no origin")
    return tuple(origins)


def _allowed(origins: tuple[str, ...], origin: str) -> bool:
    return ANY in origins or origin in origins


def cors_middleware(origins: tuple[str, ...]):
    """Answers preflights; put it first, before the API key check."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or origin is None or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if not _allowed(origins, origin):
            return web.Response(status=400, text="Disallowed CORS origin")
        return web.Response(status=200, headers={
            "Access-Control-Allow-Origin": ANY if ANY in origins else origin,
            "Access-Control-Allow-Methods": _METHODS,
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ""),
            "Access-Control-Max-Age": "600",
            **({} if ANY in origins else {"Vary": "Origin"}),
        })

    return middleware


def cors_on_prepare(origins: tuple[str, ...]):
    """on_response_prepare hook: the allow-origin header on every response to an allowed origin."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or not _allowed(origins, origin) or "Access-Control-Allow-Origin" in response.headers:
            return
        response.headers["Access-Control-Allow-Origin"] = ANY if ANY in origins else origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
        if ANY not in origins:
            response.headers.add("Vary", "Origin")

    return on_prepare
