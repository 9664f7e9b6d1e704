"""Worker -> router membership: register, heartbeat every interval, deregister on the way out.

The router being down is not fatal: the loop keeps trying, and a heartbeat answered 404 (router
restarted, or it forgot us) triggers a fresh registration.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import aiohttp
import structlog

from services.runtime.auth import cluster_headers
from services.runtime.wire import CONTENT_TYPE, WorkerLoad, WorkerRegistration, encode

log = structlog.get_logger()


class RouterLink:
    def __init__(self, session: aiohttp.ClientSession, router_url: str, token: str, info: WorkerRegistration,
                 on_kv_summary: Callable[[dict], None] | None = None):
        self._session = session
        self._on_kv_summary = on_kv_summary  # the cluster's lendable KV, as each heartbeat answer says
        self._base = router_url.rstrip("/") + "/internal/workers"
        self._headers = {**cluster_headers(token), "Content-Type": CONTENT_TYPE}
        self.info = info
        self.registered = False
        self._reachable = True

    async def _post(self, url: str, data: bytes) -> int:
        async with self._session.post(url, data=data, headers=self._headers) as resp:
            if resp.status == 200 and resp.content_type == "application/json":
                body = await resp.json()
                if self._on_kv_summary is not None and "kv" in body:
                    self._on_kv_summary(body["kv"])
            else:
                await resp.read()
            return resp.status

    async def register(self) -> None:
        status = await self._post(self._base, encode(self.info))
        if status != 200:
            raise RuntimeError(f"router refused registration: HTTP {status}")
        self.registered = True
        log.info("worker_registered", worker_id=self.info.worker_id, router=self._base)

    async def update(self, info: WorkerRegistration) -> None:
        """Register again with what changed (its LoRA adapters). If the router cannot be told now,
        the next heartbeat registers again."""
        self.info = info
        try:
            await self.register()
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
            self.registered = False
            log.warning("registration_update_failed", worker_id=info.worker_id, error=repr(e))

    async def heartbeat(self, load: WorkerLoad) -> None:
        if not self.registered:
            await self.register()
        status = await self._post(f"{self._base}/{self.info.worker_id}/heartbeat", encode(load))
        if status == 404:
            self.registered = False
            await self.register()
        elif status != 200:
            raise RuntimeError(f"router refused heartbeat: HTTP {status}")

    async def deregister(self) -> None:
        if not self.registered:
            return
        self.registered = False
        try:
            async with self._session.delete(f"{self._base}/{self.info.worker_id}", headers=self._headers) as resp:
                await resp.read()
            log.info("worker_deregistered", worker_id=self.info.worker_id)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("deregister_failed", worker_id=self.info.worker_id, error=repr(e))

    async def run(self, load: Callable[[], WorkerLoad], interval_s: float) -> None:
        """Heartbeat forever; log only when reachability changes."""
        while True:
            try:
                await self.heartbeat(load())
                if not self._reachable:
                    log.info("router_reachable", router=self._base)
                self._reachable = True
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
                if self._reachable:
                    log.warning("router_unreachable", router=self._base, error=repr(e))
                self._reachable = False
                self.registered = False
            await asyncio.sleep(interval_s)
