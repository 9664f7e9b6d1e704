"""Run an aiohttp service under uvloop until SIGTERM/SIGINT, with a drain hook before cleanup."""

from __future__ import annotations

import asyncio
import signal
import ssl
from typing import Awaitable, Callable

import structlog
import uvloop
from aiohttp import web

Drain = Callable[[web.Application], Awaitable[None]]


async def _serve(app: web.Application, host: str, port: int, drain: Drain | None, shutdown_timeout: float,
                 ssl_context: ssl.SSLContext | None) -> None:
    log = structlog.get_logger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed before start-up, which may wait (a memserver waits for the model's KV geometry):
    # SIGTERM then ends the wait cleanly instead of killing the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # handler_cancellation: a client that disconnects cancels its handler at once, which is how an
    # abandoned stream frees its KV blocks without waiting for the next write to fail.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    try:
        started = await _until_stopped(runner.setup(), stop)
    except BaseException:
        await app.cleanup()  # close what the contexts before the failing one opened (sessions, UCX)
        raise
    if not started:
        log.info("shutdown_requested", during="start_up")
        return
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        bound = [a[1] for a in runner.addresses if isinstance(a, tuple)]
        log.info("service_started", host=host, port=bound[0] if bound else port,
                 scheme="https" if ssl_context is not None else "http")
        await stop.wait()
        log.info("shutdown_requested")
        if drain is not None:
            await drain(app)
    finally:
        await runner.cleanup()


async def _until_stopped(coro: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run coro unless stop is set first (then cancel it); True when coro finished."""
    work = asyncio.ensure_future(coro)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if work.done():
        work.result()  # start-up errors propagate
        return True
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return False


def run_service(
    app: web.Application, host: str, port: int, *, drain: Drain | None = None, shutdown_timeout: float = 2.0,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, host, port, drain, shutdown_timeout, ssl_context))
    return 0
