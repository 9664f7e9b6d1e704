"""The memory server process: a block pool served over the transport, registered with the router,
plus a small HTTP app for probes (/health) and block accounting (/internal/stats)."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import structlog
import torch
from aiohttp import web

from services.memserver.config import MemserverConfig
from services.memserver.pool import BlockPool, Geometry
from services.memserver.router_link import RouterLink
from services.memserver.service import MemoryService
from services.runtime.auth import cluster_token_middleware
from services.runtime.bodies import json_response
from services.runtime.errors import error_middleware
from services.runtime.wire import MemserverLoad, MemserverRegistration
from transport.config import TransportConfig
from transport.node import Node

log = structlog.get_logger()

CONFIG = web.AppKey("config", MemserverConfig)
SERVICE = web.AppKey("service", MemoryService)
LINK = web.AppKey("link", RouterLink)
IDENTITY = web.AppKey("identity", dict)

routes = web.RouteTableDef()


def _load(app: web.Application) -> MemserverLoad:
    service = app[SERVICE]
    pool = service.pool
    return MemserverLoad(app[IDENTITY]["memserver_id"], pool.num_blocks, pool.num_free, pool.holdings(),
                         leaving=service.leaving)


async def _heartbeats(app: web.Application) -> None:
    config, link, service = app[CONFIG], app[LINK], app[SERVICE]
    ident = app[IDENTITY]
    absent: set[str] = set()  # owners missing from the last answer: freed if missing twice
    while True:
        try:
            live = await link.heartbeat(_load(app))
            if live is None:
                await link.register(MemserverRegistration(ident["memserver_id"], ident["address"], config.device,
                                                          service.pool.num_blocks, service.pool.num_free))
            else:
                missing = set(service.pool.holdings()) - set(live)
                service.reap(set(live) | (missing - absent))
                absent = missing
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
            log.warning("router_heartbeat_failed", error=repr(e))
        await asyncio.sleep(config.heartbeat_interval_s)


async def serving_ctx(app: web.Application):
    config = app[CONFIG]
    node = await Node.start(TransportConfig.from_env(token=config.cluster_token.encode()))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session:
        link = RouterLink(session, config.router_url, config.cluster_token)
        try:
            geometry = Geometry.from_dict(await link.geometry())
        except BaseException:  # e.g. SIGTERM while no worker has registered yet
            await node.close()
            raise
        num_blocks = config.capacity_bytes // geometry.block_bytes
        pool = BlockPool(geometry, num_blocks, config.device, config.per_owner_cap)
        service = MemoryService(pool, num_threads=torch.get_num_threads())
        server = await node.listen(service.handlers, port=config.port, host=config.host,
                                   on_session_closed=service.session_closed)
        ident = {"memserver_id": config.id_for(server.address), "address": server.address}
        app[SERVICE], app[LINK], app[IDENTITY] = service, link, ident
        await link.register(MemserverRegistration(ident["memserver_id"], server.address, config.device,
                                                  num_blocks, pool.num_free))
        log.info("memserver_started", memserver=ident["memserver_id"], address=server.address, num_blocks=num_blocks,
                 block_bytes=geometry.block_bytes, capacity_tokens=num_blocks * geometry.block_size,
                 attention_threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
        heartbeats = asyncio.create_task(_heartbeats(app), name="memserver-heartbeats")
        try:
            yield
        finally:
            heartbeats.cancel()
            await asyncio.gather(heartbeats, return_exceptions=True)
            await link.deregister(ident["memserver_id"])
            await node.close()
            service.close()


async def drain(app: web.Application) -> None:
    """SIGTERM: lend nothing more, let owners move their blocks off, leave when empty or at the deadline."""
    service, config = app.get(SERVICE), app[CONFIG]
    if service is None:
        return
    service.leaving = True
    try:
        await app[LINK].heartbeat(_load(app))  # the router stops lending from us at once
    except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
        log.warning("router_heartbeat_failed", error=repr(e))
    deadline = time.monotonic() + config.drain_timeout_s
    while service.pool.holdings() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    left = service.pool.holdings()
    log.info("memserver_drained", num_owners_left=len(left), num_blocks_left=sum(left.values()))


def create_app(config: MemserverConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware, cluster_token_middleware(config.cluster_token)])
    app[CONFIG] = config
    app.cleanup_ctx.append(serving_ctx)
    app.add_routes(routes)
    return app


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    service = request.app.get(SERVICE)
    return json_response({"status": "ok", "leaving": bool(service and service.leaving)})


@routes.get("/internal/stats")
async def stats(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    pool = service.pool
    return json_response({**request.app[IDENTITY], "num_blocks": pool.num_blocks, "num_free_blocks": pool.num_free,
                          "num_used_blocks": pool.num_blocks - pool.num_free, "holdings": pool.holdings(),
                          "leaving": service.leaving})
