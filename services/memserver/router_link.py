"""Memory server -> router: learn the KV geometry, register, heartbeat free blocks and holdings,
deregister. The heartbeat's answer lists the live workers; blocks of others are freed."""

from __future__ import annotations

import asyncio

import aiohttp
import structlog

from services.runtime.auth import cluster_headers
from services.runtime.wire import CONTENT_TYPE, MemserverLoad, MemserverRegistration, encode

log = structlog.get_logger()


class RouterLink:
    def __init__(self, session: aiohttp.ClientSession, router_url: str, token: str):
        self._session = session
        self._base = router_url.rstrip("/")
        self._headers = {**cluster_headers(token), "Content-Type": CONTENT_TYPE}

    async def geometry(self, poll_s: float = 0.5) -> dict:
        """Wait until the router knows the served model's KV geometry (a worker registered)."""
        waited = False
        while True:
            try:
                async with self._session.get(f"{self._base}/internal/kv/geometry", headers=self._headers) as resp:
                    body = await resp.json() if resp.status == 200 else {}
                    if resp.status == 401:
                        raise RuntimeError("the router refused our cluster token")
            except (aiohttp.ClientError, TimeoutError) as e:
                body = {}
                if not waited:
                    log.info("router_unreachable", router=self._base, error=repr(e))
            if body.get("geometry"):
                return body["geometry"]
            if not waited:
                log.info("waiting_for_kv_geometry", router=self._base, reason="no worker registered yet")
                waited = True
            await asyncio.sleep(poll_s)

    async def _post(self, path: str, data: bytes) -> tuple[int, dict]:
        async with self._session.post(self._base + path, data=data, headers=self._headers) as resp:
            body = await resp.json() if resp.content_type == "application/json" else {}
            return resp.status, body

    async def register(self, info: MemserverRegistration) -> None:
        status, _ = await self._post("/internal/memservers", encode(info))
        if status != 200:
            raise RuntimeError(f"router refused registration: HTTP {status}")
        log.info("memserver_registered", memserver=info.memserver_id, num_blocks=info.num_blocks)

    async def heartbeat(self, load: MemserverLoad) -> list[str] | None:
        """Returns the live workers, or None if the router does not know us (register again)."""
        status, body = await self._post(f"/internal/memservers/{load.memserver_id}/heartbeat", encode(load))
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"router refused heartbeat: HTTP {status}")
        return body.get("live_workers", [])

    async def deregister(self, memserver_id: str) -> None:
        try:
            async with self._session.delete(f"{self._base}/internal/memservers/{memserver_id}",
                                            headers=self._headers) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("deregister_failed", memserver=memserver_id, error=repr(e))
