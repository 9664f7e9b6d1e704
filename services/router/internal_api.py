"""Cluster-internal routes (cluster token required, enforced by middleware): worker membership."""

from __future__ import annotations

import structlog
from aiohttp import web

from services.router.keys import REGISTRY
from services.router.kv_api import kv_summary
from services.router.lora_api import RUNTIME_ADAPTERS
from services.runtime.bodies import json_response, read_message
from services.runtime.errors import ApiError
from services.runtime.wire import WorkerLoad, WorkerRegistration

log = structlog.get_logger()
routes = web.RouteTableDef()


@routes.post("/internal/workers")
async def register(request: web.Request) -> web.Response:
    info: WorkerRegistration = await read_message(request, WorkerRegistration)
    request.app[REGISTRY].register(info)
    request.app[RUNTIME_ADAPTERS].give(request.app, info)  # those loaded at runtime before it came
    log.info("worker_registered", worker_id=info.worker_id, url=info.url, model=info.model_name,
             num_blocks=info.num_total_blocks)
    return json_response({"registered": info.worker_id})


@routes.post("/internal/workers/{worker_id}/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    load: WorkerLoad = await read_message(request, WorkerLoad)
    if load.worker_id != request.match_info["worker_id"]:
        raise ApiError("worker_id in path and body differ", param="worker_id")
    if not request.app[REGISTRY].heartbeat(load):
        raise ApiError(f"unknown worker {load.worker_id}; register first", status=404, code="unknown_worker")
    return json_response({"ok": True, "kv": kv_summary(request.app, load.worker_id)})


@routes.delete("/internal/workers/{worker_id}")
async def deregister(request: web.Request) -> web.Response:
    worker_id = request.match_info["worker_id"]
    removed = request.app[REGISTRY].deregister(worker_id)
    log.info("worker_deregistered", worker_id=worker_id, known=removed)
    return json_response({"deregistered": removed})


@routes.get("/internal/workers")
async def list_workers(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    workers = []
    for s in registry.all():
        workers.append({
            "worker_id": s.info.worker_id, "url": s.info.url, "model": s.info.model_name,
            "live": registry.is_live(s), "inflight_requests": s.inflight_requests,
            "inflight_tokens": s.inflight_tokens,
            "load": None if s.load is None else {
                "num_running": s.load.num_running, "num_waiting": s.load.num_waiting,
                "num_free_blocks": s.load.num_free_blocks, "num_total_blocks": s.load.num_total_blocks,
                "outstanding_tokens": s.load.outstanding_tokens, "draining": s.load.draining,
                "num_remote_cached_blocks": s.load.num_remote_cached_blocks},
        })
    return json_response({"workers": workers})
