"""The worker's aiohttp app: the engine behind an internal streaming API, plus router membership.

Routes (all but /health need the cluster token):
  POST /internal/generate  msgpack GenerateCall -> 200 stream of msgpack DeltaFrames, or error JSON
  GET  /internal/stats     block accounting and load, JSON
  POST /internal/tokenize, /internal/lora, /internal/reset_prefix_cache  engine calls, JSON
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Callable

import aiohttp
import structlog
from aiohttp import web

from services.runtime.auth import cluster_token_middleware
from services.runtime.bodies import json_response, read_json_object
from services.runtime.errors import ApiError, error_middleware
from services.runtime.wire import CONTENT_TYPE, GenerateCall, WireDecodeError, WorkerLoad, WorkerRegistration, decode, encode
from services.worker.config import WorkerConfig
from services.worker.engine.api import EngineError, FinishReason
from services.worker.inflight import InflightTable
from services.worker.registration import RouterLink
from services.worker.wire_convert import to_frame, to_generate_request

log = structlog.get_logger()

EngineFactory = Callable[[WorkerConfig], Any]  # returns an AsyncEngine (or a test double)
CONFIG = web.AppKey("config", WorkerConfig)
ENGINE = web.AppKey("engine", object)
INFLIGHT = web.AppKey("inflight", InflightTable)
ROUTER_LINK = web.AppKey("router_link", RouterLink)
HEARTBEAT_TASK = web.AppKey("heartbeat_task", asyncio.Task)

routes = web.RouteTableDef()


def default_engine_factory(config: WorkerConfig):
    from services.worker.engine.client import EngineProcess

    remote = None
    if config.remote_kv:
        remote = {"cluster_token": config.cluster_token, "router_url": config.router_url, "owner": config.id}
    return EngineProcess(config.engine_config(), remote=remote)


def _engine_ctx(factory: EngineFactory):
    async def engine_ctx(app: web.Application):
        engine = factory(app[CONFIG])
        await engine.start()  # loads the model: seconds
        app[ENGINE] = engine
        log.info("engine_started", model=engine.model_name, max_model_len=engine.max_model_len,
                 num_blocks=engine.stats().num_total_blocks,
                 **_dtypes(engine),
                 sampling_defaults=engine.sampling_defaults)  # the generation config's, for unset fields
        yield
        await engine.stop()

    return engine_ctx


def _load(app: web.Application) -> WorkerLoad:
    stats = app[ENGINE].stats()
    inflight = app[INFLIGHT]
    return WorkerLoad(app[CONFIG].id, stats.num_running, stats.num_waiting, stats.num_free_blocks,
                      stats.num_total_blocks, inflight.outstanding_tokens(), inflight.draining,
                      stats.num_spec_proposed, stats.num_spec_accepted, stats.num_remote_cached_blocks,
                      stats.num_preemptions)


async def router_link_ctx(app: web.Application):
    config, engine = app[CONFIG], app[ENGINE]
    stats = engine.stats()
    info = WorkerRegistration(config.id, config.url, config.served_model_name or engine.model_name,
                              engine.max_model_len, stats.block_size, stats.num_total_blocks,
                              kv_geometry=getattr(engine, "kv_geometry", None),
                              model_aliases=list(config.served_model_aliases) or None,
                              lora_modules=dict(engine.lora_modules) if config.enable_lora else None,
                              eos_token_ids=list(getattr(engine, "eos_token_ids", ())) or None)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        link = RouterLink(session, config.router_url, config.cluster_token, info,
                          on_kv_summary=getattr(engine, "update_kv_summary", None) if config.remote_kv else None)
        app[ROUTER_LINK] = link
        app[HEARTBEAT_TASK] = asyncio.create_task(link.run(lambda: _load(app), config.heartbeat_interval_s))
        yield
        await _stop_heartbeats(app)


async def _stop_heartbeats(app: web.Application) -> None:
    task = app[HEARTBEAT_TASK]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await app[ROUTER_LINK].deregister()


def create_app(config: WorkerConfig, engine_factory: EngineFactory = default_engine_factory) -> web.Application:
    app = web.Application(middlewares=[error_middleware, cluster_token_middleware(config.cluster_token)],
                          client_max_size=64 * 1024 * 1024)
    app[CONFIG] = config
    app[INFLIGHT] = InflightTable()
    app.cleanup_ctx.append(_engine_ctx(engine_factory))
    app.cleanup_ctx.append(router_link_ctx)
    app.add_routes(routes)
    return app


@routes.post("/internal/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    inflight, engine = request.app[INFLIGHT], request.app[ENGINE]
    if inflight.draining:
        raise ApiError("worker is draining", status=503, code="draining", headers={"Retry-After": "1"})
    try:
        call = decode(await request.read(), GenerateCall)
    except WireDecodeError as e:
        raise ApiError(f"bad GenerateCall: {e}", code="wire_decode_error") from e
    gen_request = to_generate_request(call, engine.sampling_defaults)
    stream = engine.generate(gen_request)
    request_id = gen_request.request_id
    inflight.add(request_id, gen_request.sampling.max_tokens)
    finish: FinishReason | None = None
    try:
        try:
            delta = await anext(stream)
        except EngineError as e:
            raise ApiError(e.message, status=e.status, code=e.code, param=e.param) from e
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        await response.prepare(request)
        while True:
            inflight.update(request_id, delta.num_generated_tokens)
            await response.write(encode(to_frame(delta)))
            if delta.finish_reason is not None:
                finish = delta.finish_reason
                break
            delta = await anext(stream)
        await response.write_eof()
        return response
    finally:
        if finish is None:  # router went away or we failed: free the blocks now
            await engine.abort(request_id)
        await stream.aclose()
        inflight.remove(request_id, completed=finish in (FinishReason.STOP, FinishReason.LENGTH))


@routes.post("/internal/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    """The router's /tokenize and /detokenize, body as it checked it (LLMEngine.tokenize)."""
    body = await read_json_object(request)
    try:
        return json_response(await request.app[ENGINE].tokenize(body))
    except EngineError as e:
        raise ApiError(e.message, status=e.status, code=e.code, param=e.param) from e


@routes.post("/internal/lora")
async def update_lora(request: web.Request) -> web.Response:
    """The router's /v1/load_lora_adapter and /v1/unload_lora_adapter, for this worker:
    {"op": "load" | "unload", "lora_name", "lora_path"} -> {"lora_modules": the adapters after it},
    answered once the router's registration of this worker lists them."""
    config, engine = request.app[CONFIG], request.app[ENGINE]
    if not config.enable_lora:
        raise ApiError("this worker serves no LoRA adapters: start it with --enable-lora", code="lora_not_enabled")
    body = await read_json_object(request)
    op, name, path = body.get("op"), body.get("lora_name"), body.get("lora_path")
    if op not in ("load", "unload") or not isinstance(name, str) or not name or (
            op == "load" and (not isinstance(path, str) or not path)):
        raise ApiError("expected {op: load|unload, lora_name, lora_path (load)}", code="invalid_value")
    if name in config.base_names:
        raise ApiError(f"'{name}' is the base model's name: name the adapter differently", param="lora_name")
    try:
        modules = await (engine.load_lora(name, path) if op == "load" else engine.unload_lora(name))
    except EngineError as e:
        raise ApiError(e.message, status=e.status, code=e.code, param=e.param) from e
    link = request.app[ROUTER_LINK]
    await link.update(replace(link.info, lora_modules=dict(engine.lora_modules)))
    return json_response({"lora_modules": modules})


@routes.post("/internal/reset_prefix_cache")
async def reset_prefix_cache(request: web.Request) -> web.Response:
    """Forget the KV cached for prefixes that no running request uses, here and on memory servers."""
    return json_response(await request.app[ENGINE].reset_prefix_cache())


@routes.get("/internal/stats")
async def stats(request: web.Request) -> web.Response:
    s = request.app[ENGINE].stats()
    inflight = request.app[INFLIGHT]
    return json_response({
        "worker_id": request.app[CONFIG].id, "num_running": s.num_running, "num_waiting": s.num_waiting,
        "num_total_blocks": s.num_total_blocks, "num_free_blocks": s.num_free_blocks,
        "num_used_blocks": s.num_total_blocks - s.num_free_blocks, "block_size": s.block_size,
        "num_spec_proposed": s.num_spec_proposed, "num_spec_accepted": s.num_spec_accepted,
        "num_remote_blocks": s.num_remote_blocks, "num_remote_cached_blocks": s.num_remote_cached_blocks,
        "num_preemptions": s.num_preemptions,
        "num_inflight": len(inflight), "outstanding_tokens": inflight.outstanding_tokens(),
        "draining": inflight.draining, **_dtypes(request.app[ENGINE]),
    })


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "draining": request.app[INFLIGHT].draining})


async def drain(app: web.Application) -> None:
    """SIGTERM: stop admitting, leave the rotation, finish in-flight work within the deadline, abort
    the rest; one log line with counts."""
    inflight, engine = app[INFLIGHT], app[ENGINE]
    inflight.draining = True
    await _stop_heartbeats(app)
    num_at_signal, completed_before = len(inflight), inflight.num_completed
    finished = await inflight.wait_empty(app[CONFIG].drain_timeout_s)
    num_forced = 0
    if not finished:
        for request_id in inflight.request_ids():
            num_forced += 1
            await engine.abort(request_id)
        await inflight.wait_empty(5.0)
    log.info("worker_drained", num_inflight_at_signal=num_at_signal,
             num_completed=inflight.num_completed - completed_before, num_aborted=num_forced,
             num_left=len(inflight))


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: the model is loaded (the server only listens after that) and we are not draining."""
    if request.app[INFLIGHT].draining:
        raise ApiError("worker is draining", status=503, code="draining")
    return json_response({"status": "ready"})


def _dtypes(engine) -> dict:
    """The model's dtype and its KV cache's (they differ with --kv-cache-dtype fp8)."""
    geometry = getattr(engine, "kv_geometry", None) or {}
    return {"dtype": geometry.get("compute_dtype"), "kv_cache_dtype": geometry.get("dtype")}
