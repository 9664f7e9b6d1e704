"""The cluster token: a shared secret that guards every /internal/ endpoint. API keys: what
clients of the OpenAI API present, when the router is given any.

Resolution order: --cluster-token, then $KVMESH_CLUSTER_TOKEN, then DEV_CLUSTER_TOKEN. The dev
default is public, so it is refused on any non-loopback address: a cluster reachable from other
hosts must set its own token.

API keys (vLLM's --api-key): --api-key (repeatable), else $KVMESH_API_KEY (comma-separated); none
means an open API. With keys, the OpenAI routes (/v1/..., /tokenize, /detokenize) need
``Authorization: Bearer <key>``; probes (/health, /ready, /metrics, /version) and /cluster stay
open, and /internal/ keeps its cluster token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from aiohttp import web

from services.runtime.errors import ApiError

CLUSTER_TOKEN_ENV = "KVMESH_CLUSTER_TOKEN"
CLUSTER_TOKEN_HEADER = "X-Kvmesh-Cluster-Token"
DEV_CLUSTER_TOKEN = "kvmesh-dev-insecure-token"
INTERNAL_PREFIX = "/internal/"
API_KEY_ENV = "KVMESH_API_KEY"
API_KEY_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/reset_prefix_cache")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_cluster_token(flag: str | None, host: str) -> str:
    token = flag or os.environ.get(CLUSTER_TOKEN_ENV) or DEV_CLUSTER_TOKEN
    if token == DEV_CLUSTER_TOKEN and not is_loopback(host):
        raise ValueError(
            f"binding {host} needs a cluster token: pass --cluster-token or set {CLUSTER_TOKEN_ENV} "
            "(the built-in dev token is only accepted on loopback)"
        )
    return token


def token_matches(expected: str, presented: str | None) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def cluster_headers(token: str) -> dict[str, str]:
    return {CLUSTER_TOKEN_HEADER: token}


def cluster_token_middleware(token: str):
    """Reject requests under /internal/ that do not present the cluster token (401)."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith(INTERNAL_PREFIX) and not token_matches(
            token, request.headers.get(CLUSTER_TOKEN_HEADER)
        ):
            raise ApiError("missing or wrong cluster token", status=401, code="invalid_cluster_token")
        return await handler(request)

    return middleware


def resolve_api_keys(flags: list[str] | None) -> tuple[str, ...]:
    """--api-key values, else $KVMESH_API_KEY split at commas; () leaves the API open."""
    keys = list(flags) if flags else [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    for key in keys:
        if not key.strip() or key != key.strip():
            raise ValueError(f"an API key must be non-empty, without surrounding spaces, got {key!r}")
    return tuple(keys)


def api_key_matches(keys: tuple[str, ...], authorization: str | None) -> bool:
    """``Authorization: Bearer <key>`` names one of ``keys`` (every key compared in constant time)."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return sum(hmac.compare_digest(key.encode(), presented.strip().encode()) for key in keys) > 0


def api_key_middleware(keys: tuple[str, ...]):
    """Reject requests to the OpenAI routes without one of ``keys`` (401, as OpenAI answers a
    wrong key); no keys: nothing to check."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if keys and request.path.startswith(API_KEY_PREFIXES) and not api_key_matches(
            keys, request.headers.get("Authorization")
        ):
            raise ApiError("missing or incorrect API key: send 'Authorization: Bearer <key>'", status=401,
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware
