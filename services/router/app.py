"""The router's aiohttp app. Imports no torch (tests check it): it never tokenizes."""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web

from services.router import cache_api, internal_api, kv_api, lora_api, openai_api
from services.router.admission import Admission
from services.router.config import RouterConfig
from services.router.cors import cors_middleware, cors_on_prepare
from services.router.keys import ADMISSION, CONFIG, LEDGER, METRICS, POOL, REGISTRY, RESPONSES
from services.router.responses_store import ResponseStore
from services.router.ledger import Ledger
from services.router.metrics import RouterMetrics
from services.router.policy import PrefixAffinity, RoutingPolicy
from services.router.registry import WorkerRegistry
from services.router.worker_client import WorkerPool
from services.runtime.auth import api_key_middleware, cluster_token_middleware
from services.runtime.errors import error_middleware

log = structlog.get_logger()


def _worker_pool_ctx(policy: RoutingPolicy):
    async def worker_pool_ctx(app: web.Application):
        config = app[CONFIG]
        timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s)
        # limit=0: the admission cap, not the connector, bounds concurrency to workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            app[POOL] = WorkerPool(app[REGISTRY], session, policy, config.cluster_token)
            yield

    return worker_pool_ctx


def create_app(config: RouterConfig, policy: RoutingPolicy | None = None) -> web.Application:
    """policy: None routes by prefix affinity within a load bound (a PrefixAffinity of this app's own)."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[cors_middleware(config.allowed_origins), error_middleware,
                     cluster_token_middleware(config.cluster_token), api_key_middleware(config.api_keys)],
    )
    app.on_response_prepare.append(cors_on_prepare(config.allowed_origins))
    registry = WorkerRegistry(config.heartbeat_timeout_s)
    app[CONFIG] = config
    app[REGISTRY] = registry
    ledger = Ledger(config.heartbeat_timeout_s)
    app[LEDGER] = ledger
    app[METRICS] = RouterMetrics(registry, ledger)
    app[ADMISSION] = Admission(config.max_inflight_requests)
    app[RESPONSES] = ResponseStore(config.responses_store_size)
    app[lora_api.RUNTIME_ADAPTERS] = lora_api.RuntimeAdapters()
    app.cleanup_ctx.append(_worker_pool_ctx(policy if policy is not None else PrefixAffinity()))
    app.cleanup_ctx.append(kv_api._expiry_ctx(max(0.2, config.heartbeat_timeout_s / 4)))
    app.add_routes(openai_api.routes)
    app.add_routes(lora_api.routes)
    app.add_routes(cache_api.routes)
    app.add_routes(internal_api.routes)
    app.add_routes(kv_api.routes)
    return app


async def drain(app: web.Application) -> None:
    """SIGTERM: refuse new requests, let in-flight ones finish within the deadline."""
    admission = app[ADMISSION]
    admission.draining = True
    num_inflight = admission.num_inflight
    finished = await admission.wait_idle(app[CONFIG].drain_timeout_s)
    log.info("router_drained", num_inflight_at_signal=num_inflight, num_unfinished=0 if finished else admission.num_inflight)
