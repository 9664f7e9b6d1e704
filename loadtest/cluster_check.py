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
    result = {"checked": True, "ok": view.num_used_blocks == 0, **view.to_json()}
    if not result["ok"]:
        result["holders"] = await asyncio.to_thread(_holders, base, token)
    return result


def _holders(base: str, token: str) -> list[str]:
    """Who holds the blocks, from the router's /cluster (to say where a leak is)."""
    _, body = probe.get_json(base + "/cluster", token)
    if not body:
        return []
    nodes = [(w["worker_id"], w) for w in body.get("workers", [])] + [
        (m["memserver_id"], m) for m in body.get("memservers", [])]
    used = [f"{name}: {n['num_used_blocks']} used" + (" (silent)" if n.get("silent") else "")
            for name, n in nodes if n.get("num_used_blocks")]
    lent = [f"lent: {e['worker_id']} -> {e['memserver_id']} {e['num_blocks']}" for e in body.get("lent", [])]
    return used + lent
