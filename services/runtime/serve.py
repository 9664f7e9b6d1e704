"""Run an aiohttp service under uvloop until SIGTERM/SIGINT, with a drain hook before cleanup."""

from __future__ import annotations

import asyncio
import signal
from typing import Awaitable, Callable

import structlog
import uvloop
from aiohttp import web

Drain = Callable[[web.Application], Awaitable[None]]


async def _serve(app: web.Application, host: str, port: int, drain: Drain | None, shutdown_timeout: float) -> None:
    log = structlog.get_logger()
    # handler_cancellation: a client that disconnects cancels its handler at once, which is how an
    # abandoned stream frees its KV blocks without waiting for the next write to fail.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = [a[1] for a in runner.addresses if isinstance(a, tuple)]
        log.info("service_started", host=host, port=bound[0] if bound else port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutdown_requested")
        if drain is not None:
            await drain(app)
    finally:
        await runner.cleanup()


def run_service(
    app: web.Application, host: str, port: int, *, drain: Drain | None = None, shutdown_timeout: float = 2.0
) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, host, port, drain, shutdown_timeout))
    return 0
