"""Drive a UCX worker from the asyncio loop: blocking mode, no progress thread, no busy core.

The worker's epoll fd is a loop reader. On each wake-up (or after Python submits work) the worker
is progressed, finished UCX requests resolve their asyncio futures, and then, while requests are
still pending and activity was recent (``spin_us``), progress is retried on the next loop turn
(catching a fast reply without an epoll round trip, yet letting other tasks run); otherwise the
worker is armed and the loop sleeps in epoll. A slow tick guards against a missed wake-up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

_TICK_S = 0.05  # safety net: progress at least this often while anything is pending


class Progress:
    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, spin_us: int) -> None:
        self._worker = worker
        self._loop = loop
        self._spin_s = spin_us / 1e6
        self._spin_until = 0.0
        self._waits: list[tuple[Any, asyncio.Future | None, Any]] = []  # (request, future, keep)
        self._probes: list[tuple[Any, asyncio.Future]] = []  # (tag, future of TagProbeResult)
        self._scheduled = False
        self._closed = False
        worker.init_blocking_progress_mode()
        self._fd = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self._drive)
        self._tick_handle = loop.call_later(_TICK_S, self._tick)

    @property
    def num_pending(self) -> int:
        return len(self._waits) + len(self._probes)

    def wait(self, request: Any, keep: Any = None) -> asyncio.Future:
        """A future resolved when the UCX request completes (exception = the UCX error).
        ``keep`` (e.g. the buffer) is held until then."""
        fut = self._loop.create_future()
        if request.completed:
            _settle(request, fut)
        else:
            self._waits.append((request, fut, keep))
            self.kick()
        return fut

    def detach(self, request: Any, keep: Any = None) -> None:
        """Fire and forget: hold ``keep`` until the request completes; errors surface elsewhere
        (the endpoint's error callback)."""
        if not request.completed:
            self._waits.append((request, None, keep))
            self.kick()

    def probe(self, tag: Any) -> asyncio.Future:
        """A future resolved with the TagProbeResult (removed from UCX's queue) once a tagged
        message with exactly ``tag`` has arrived."""
        fut = self._loop.create_future()
        self._probes.append((tag, fut))
        self.kick()
        return fut

    def kick(self) -> None:
        self._spin_until = time.monotonic() + self._spin_s
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _drive(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        self._worker.progress()
        if self._poll():
            self._spin_until = time.monotonic() + self._spin_s
        if self.num_pending and time.monotonic() < self._spin_until:
            self._scheduled = True
            self._loop.call_soon(self._drive)
        elif not self._worker.arm():  # events arrived meanwhile: progress again
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _poll(self) -> bool:
        done_any = False
        if self._waits:
            still = []
            for item in self._waits:
                request, fut, _ = item
                if request.completed:
                    done_any = True
                    if fut is not None:
                        _settle(request, fut)
                else:
                    still.append(item)
            self._waits = still
        if self._probes:
            still = []
            for tag, fut in self._probes:
                if fut.done():  # cancelled by its owner
                    continue
                result = self._worker.tag_probe(tag, remove=True)
                if result.matched:
                    done_any = True
                    fut.set_result(result)
                else:
                    still.append((tag, fut))
            self._probes = still
        return done_any

    def _tick(self) -> None:
        if self._closed:
            return
        if self.num_pending:
            self._drive()
        self._tick_handle = self._loop.call_later(_TICK_S if self.num_pending else 1.0, self._tick)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._tick_handle.cancel()
        self._loop.remove_reader(self._fd)
        for _, fut, _ in self._waits:
            if fut is not None and not fut.done():
                fut.cancel()
        for _, fut in self._probes:
            if not fut.done():
                fut.cancel()
        self._waits.clear()
        self._probes.clear()


def _settle(request: Any, fut: asyncio.Future) -> None:
    if fut.done():
        return
    try:
        request.check_error()
    except Exception as e:  # the UCX status, re-raised by the awaiting coroutine
        fut.set_exception(e)
    else:
        fut.set_result(None)
