"""Typed app-state keys of the router app."""

from __future__ import annotations

from aiohttp import web

from services.router.responses_store import ResponseStore
from services.router.admission import Admission
from services.router.config import RouterConfig
from services.router.ledger import Ledger
from services.router.metrics import RouterMetrics
from services.router.registry import WorkerRegistry
from services.router.worker_client import WorkerPool

CONFIG = web.AppKey("config", RouterConfig)
REGISTRY = web.AppKey("registry", WorkerRegistry)
METRICS = web.AppKey("metrics", RouterMetrics)
ADMISSION = web.AppKey("admission", Admission)
POOL = web.AppKey("pool", WorkerPool)  # set by the client-session context at start-up
LEDGER = web.AppKey("ledger", Ledger)
RESPONSES = web.AppKey("responses", ResponseStore)  # stored /v1/responses
