"""Request errors as OpenAI-style JSON: one exception type, one renderer, one middleware."""

from __future__ import annotations

import json

import structlog
from aiohttp import web

log = structlog.get_logger()


class ApiError(Exception):
    """A request error with an HTTP status; rendered as {"error": {message, type, param, code}}."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return error_type(self.status)


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_payload(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: ApiError) -> web.Response:
    return web.Response(
        status=err.status,
        text=json.dumps(error_payload(err)),
        content_type="application/json",
        headers=err.headers,
    )


def api_error_from_payload(status: int, body: bytes) -> ApiError:
    """Rebuild an ApiError from a peer's error JSON (e.g. a worker's 400), keeping status and code."""
    try:
        err = json.loads(body)["error"]
        return ApiError(str(err["message"]), status=status, code=err.get("code"), param=err.get("param"))
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace")[:200]
        return ApiError(f"upstream error {status}: {text}", status=status, code="upstream_error")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = "request_too_large" if e.status == 413 else None
        message = e.text if e.status != 413 else f"request body too large ({e.text})"
        return error_response(ApiError(message, status=e.status, code=code))
    except Exception:
        log.exception("request_failed", path=request.path)
        return error_response(ApiError("internal server error", status=500, code="internal_error"))
