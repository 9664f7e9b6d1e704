"""The global KV manager's routes: memory-server membership, the borrow ledger, `GET /cluster`."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web

from services.router.keys import LEDGER, REGISTRY
from services.router.ledger import InsufficientCapacity
from services.router.registry import FORGET_AFTER_TIMEOUTS
from services.runtime.bodies import json_response, read_message
from services.runtime.errors import ApiError
from services.runtime.wire import (
    BorrowRequest, MemserverLoad, MemserverRegistration, Repay, Settle,
)

log = structlog.get_logger()
routes = web.RouteTableDef()


def kv_geometry(app: web.Application) -> dict | None:
    for state in app[REGISTRY].all():
        if state.info.kv_geometry:
            return state.info.kv_geometry
    return None


def kv_summary(app: web.Application, worker_id: str | None = None) -> dict:
    """What workers need each heartbeat: how much the cluster could lend, and who is leaving; for
    `worker_id`, also what other workers only cache (they give it up when asked:
    "reclaimable_blocks") and how much of its own cache others need now ("reclaim")."""
    ledger, registry = app[LEDGER], app[REGISTRY]
    summary = {
        "free_blocks": ledger.free_blocks(),
        "capacity_blocks": ledger.capacity_blocks(),
        "memservers": {s.memserver_id: s.address for s in ledger.servers()},
        "leaving": [s.memserver_id for s in ledger.servers() if s.leaving],
    }
    if worker_id is not None:
        summary["reclaimable_blocks"] = sum(s.load.num_remote_cached_blocks for s in registry.live()
                                            if s.load is not None and s.info.worker_id != worker_id)
        summary["reclaim"] = ledger.wanted_by_others(worker_id)
    return summary


@routes.get("/internal/kv/summary")
async def summary(request: web.Request) -> web.Response:
    return json_response(kv_summary(request.app, request.query.get("worker_id")))


@routes.get("/internal/kv/geometry")
async def geometry(request: web.Request) -> web.Response:
    return json_response({"geometry": kv_geometry(request.app)})


@routes.post("/internal/memservers")
async def register(request: web.Request) -> web.Response:
    info: MemserverRegistration = await read_message(request, MemserverRegistration)
    request.app[LEDGER].register(info.memserver_id, info.address, info.device, info.num_blocks, info.num_free)
    log.info("memserver_registered", memserver=info.memserver_id, address=info.address, device=info.device,
             num_blocks=info.num_blocks)
    return json_response({"registered": info.memserver_id})


@routes.post("/internal/memservers/{memserver_id}/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    load: MemserverLoad = await read_message(request, MemserverLoad)
    ledger = request.app[LEDGER]
    if not ledger.heartbeat(load.memserver_id, load.num_free, load.holdings):
        raise ApiError(f"unknown memserver {load.memserver_id}; register first", status=404, code="unknown_memserver")
    if load.leaving:
        ledger.leave(load.memserver_id)
    registry = request.app[REGISTRY]
    # Owners a memserver may keep blocks for: workers the router knows and has heard from lately
    # (a draining one, or one it saw fail, too, while it still heartbeats).
    return json_response({"live_workers": [s.info.worker_id for s in registry.present()]})


@routes.delete("/internal/memservers/{memserver_id}")
async def deregister(request: web.Request) -> web.Response:
    memserver_id = request.match_info["memserver_id"]
    removed = request.app[LEDGER].remove(memserver_id) is not None
    log.info("memserver_deregistered", memserver=memserver_id, known=removed)
    return json_response({"deregistered": removed})


@routes.post("/internal/kv/borrow")
async def borrow(request: web.Request) -> web.Response:
    req: BorrowRequest = await read_message(request, BorrowRequest)
    if not isinstance(req.near, (list, tuple)) or not all(isinstance(m, str) for m in req.near):
        raise ApiError(f"near must be a list of memserver ids, got {req.near!r}", param="near")
    try:
        if not isinstance(req.need, int) or req.need < 0:
            raise ApiError(f"need must be an integer >= 0, got {req.need!r}", param="need")
        grants = request.app[LEDGER].borrow(req.worker_id, req.num_blocks, tuple(req.near), req.need)
    except InsufficientCapacity as e:
        raise ApiError(str(e), status=409, code="insufficient_capacity") from e
    except ValueError as e:
        raise ApiError(str(e), param="num_blocks") from e
    return json_response({"grants": [
        {"reservation_id": g.reservation_id, "memserver_id": g.memserver_id, "address": g.address,
         "num_blocks": g.num_blocks} for g in grants
    ]})


@routes.post("/internal/kv/settle")
async def settle(request: web.Request) -> web.Response:
    req: Settle = await read_message(request, Settle)
    cut_off = request.app[LEDGER].settle(req.reservation_id, req.num_stored, req.unreachable)
    if cut_off is not None:
        log.warning("memserver_unreachable", memserver=cut_off, reported_by=req.worker_id)
    return json_response({"ok": True})


@routes.post("/internal/kv/repay")
async def repay(request: web.Request) -> web.Response:
    req: Repay = await read_message(request, Repay)
    request.app[LEDGER].repay(req.worker_id, req.memserver_id, req.num_blocks)
    return json_response({"ok": True})


@routes.get("/cluster")
async def cluster(request: web.Request) -> web.Response:
    return json_response(cluster_view(request.app))


def cluster_view(app: web.Application) -> dict:
    registry, ledger = app[REGISTRY], app[LEDGER]
    workers = []
    block_size = 0
    for s in registry.all():
        block_size = block_size or s.info.block_size
        total = s.load.num_total_blocks if s.load else s.info.num_total_blocks
        free = s.load.num_free_blocks if s.load else total
        workers.append({"worker_id": s.info.worker_id, "live": registry.is_live(s), "url": s.info.url,
                        "silent": registry.is_silent(s),
                        "block_size": s.info.block_size, "num_blocks": total, "num_free_blocks": free,
                        "num_used_blocks": total - free,
                        # its blocks on memory servers that only cache a prefix (room, when needed)
                        "num_remote_cached_blocks": s.load.num_remote_cached_blocks if s.load else 0})
    memservers = [{"memserver_id": s.memserver_id, "address": s.address, "device": s.device,
                   "num_blocks": s.num_blocks, "num_free_blocks": s.num_free,
                   "num_used_blocks": s.num_blocks - s.num_free, "leaving": s.leaving,
                   "unreachable": s.unreachable} for s in ledger.servers()]
    lent = [{"worker_id": w, "memserver_id": m, "num_blocks": n} for (w, m), n in sorted(ledger.lent().items())]
    remote_total = sum(m["num_blocks"] for m in memservers)
    remote_free = ledger.free_blocks() + sum(w["num_remote_cached_blocks"] for w in workers if w["live"])
    live_workers = [w for w in workers if w["live"]]
    # A silent worker is presumed gone with its blocks: listed with its last report, not counted.
    present = [w for w in workers if not w["silent"]]
    best_total = max((w["num_blocks"] for w in live_workers), default=0)
    best_free = max((w["num_free_blocks"] for w in live_workers), default=0)
    return {
        "block_size": block_size,
        "workers": workers,
        "memservers": memservers,
        "lent": lent,
        # One sequence can use its worker's pool plus every memory server.
        "max_context_tokens": (best_total + remote_total) * block_size if live_workers else 0,
        "free_context_tokens": (best_free + remote_free) * block_size if live_workers else 0,
        "num_total_blocks": sum(w["num_blocks"] for w in present) + remote_total,
        "num_used_blocks": sum(w["num_used_blocks"] for w in present) + sum(m["num_used_blocks"] for m in memservers),
    }


def _expiry_ctx(interval_s: float):
    """Memory servers silent past the heartbeat timeout leave the ledger; workers silent far longer
    leave the registry (until then /cluster lists them as silent, with their last report). A tick
    that comes late by more than a tick means the router itself stalled (frozen, starved of CPU):
    the heartbeats it could not receive meanwhile are not held against anyone. Else, thawed after
    a few seconds, it dropped every memory server at once (chaos, freeze-router)."""
    async def expiry(app: web.Application):
        async def loop():
            last = time.monotonic()
            while True:
                await asyncio.sleep(interval_s)
                now = time.monotonic()
                stalled, last = now - last - interval_s, now
                if stalled > interval_s:
                    app[LEDGER].excuse(stalled)
                    app[REGISTRY].excuse(stalled)
                    log.warning("router_stalled", seconds=round(stalled, 2))
                for memserver_id in app[LEDGER].expire():
                    log.warning("memserver_expired", memserver=memserver_id)
                for worker_id in app[REGISTRY].forget_silent():
                    log.warning("worker_forgotten", worker=worker_id,
                                reason=f"silent for {FORGET_AFTER_TIMEOUTS} heartbeat timeouts")

        task = asyncio.create_task(loop(), name="expiry")
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    return expiry
