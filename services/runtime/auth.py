"""The cluster token: a shared secret that guards every /internal/ endpoint.

Resolution order: --cluster-token, then $KVMESH_CLUSTER_TOKEN, then DEV_CLUSTER_TOKEN. The dev
default is public, so it is refused on any non-loopback address: a cluster reachable from other
hosts must set its own token.
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
