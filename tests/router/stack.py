"""An in-process router + worker(s) over loopback, with FakeEngine: the services without a model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

import aiohttp
from aiohttp.test_utils import TestServer

from services.router.app import create_app as create_router_app
from services.router.config import RouterConfig
from services.runtime.auth import cluster_headers
from services.runtime.ports import free_port
from services.worker.app import create_app as create_worker_app
from services.worker.config import WorkerConfig
from tests.router.fake_engine import FakeEngine

TOKEN = "test-token"


@dataclass
class Stack:
    router: TestServer
    client: aiohttp.ClientSession
    engines: list[FakeEngine] = field(default_factory=list)
    workers: list[TestServer] = field(default_factory=list)

    def url(self, path: str) -> str:
        return str(self.router.make_url(path))

    async def post(self, path: str, body) -> aiohttp.ClientResponse:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return await self.client.post(self.url(path), data=data)

    async def wait_blocks_free(self, timeout: float = 3.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while any(e.used for e in self.engines):
            assert asyncio.get_running_loop().time() < deadline, "KV blocks still in use"
            await asyncio.sleep(0.02)


async def start_worker(stack: Stack, engine: FakeEngine) -> None:
    port = free_port()
    # Fixed ids (not host:port): routing by prefix hashes them, and a test's spread must not
    # depend on the ports it got.
    config = WorkerConfig(router_url=str(stack.router.make_url("")).rstrip("/"), port=port, cluster_token=TOKEN,
                          heartbeat_interval_s=0.05, drain_timeout_s=1.0, worker_id=f"fake{len(stack.engines)}")
    server = TestServer(create_worker_app(config, lambda _: engine), host="127.0.0.1", port=port)
    await server.start_server()
    stack.engines.append(engine)
    stack.workers.append(server)


async def wait_ready(stack: Stack, num_workers: int) -> None:
    for _ in range(200):
        async with stack.client.get(stack.url("/ready")) as resp:
            if (await resp.json())["num_live_workers"] >= num_workers:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("workers did not register")


@contextlib.asynccontextmanager
async def running_stack(num_workers: int = 1, engine_kwargs: dict | None = None, **router_kwargs):
    config = RouterConfig(cluster_token=TOKEN, heartbeat_timeout_s=1.0, **router_kwargs)
    router = TestServer(create_router_app(config), host="127.0.0.1")
    await router.start_server()
    async with aiohttp.ClientSession() as client:
        stack = Stack(router, client)
        try:
            for _ in range(num_workers):
                await start_worker(stack, FakeEngine(**(engine_kwargs or {})))
            if num_workers:
                await wait_ready(stack, num_workers)
            yield stack
        finally:
            for w in stack.workers:
                await w.close()
            await router.close()


def internal_headers() -> dict[str, str]:
    return cluster_headers(TOKEN)


async def read_sse(resp: aiohttp.ClientResponse) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except the literal [DONE]."""
    events = []
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
