"""After a run: does the kvmesh cluster hold zero used KV blocks? Via the router's /cluster when it
has one, else each worker's /internal/stats (cluster token needed). Other servers: not checked."""

from __future__ import annotations

import asyncio
import os

from services.launch import probe
from services.runtime.auth import CLUSTER_TOKEN_ENV, DEV_CLUSTER_TOKEN


def resolve_token(flag: str | None) -> str:
    return flag or os.environ.get(CLUSTER_TOKEN_ENV) or DEV_CLUSTER_TOKEN


async def check_zero_used_blocks(url: str, token: str, timeout_s: float = 10.0) -> dict:
    """{"checked", "ok", "num_used_blocks", "source", ...} or {"checked": False, "reason": ...}."""
    base = url.rstrip("/").removesuffix("/v1")
    try:
        view = await asyncio.to_thread(probe.wait_zero_used_blocks, base, token, timeout_s)
    except RuntimeError as e:
        return {"checked": False, "reason": str(e)}
    return {"checked": True, "ok": view.num_used_blocks == 0, **view.to_json()}
