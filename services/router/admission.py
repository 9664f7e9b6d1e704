"""Admission control: a cap on client requests in flight, and a drain switch."""

from __future__ import annotations

import asyncio
import contextlib

from services.runtime.errors import ApiError


class Admission:
    def __init__(self, max_inflight: int):
        self.max_inflight = max_inflight
        self.num_inflight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def admit(self):
        if self.draining:
            raise ApiError("server is shutting down", status=503, code="shutting_down", headers={"Retry-After": "1"})
        if self.num_inflight >= self.max_inflight:
            raise ApiError(
                f"too many requests in flight ({self.num_inflight} of {self.max_inflight}); retry later",
                status=429, code="too_many_requests", headers={"Retry-After": "1"},
            )
        self.num_inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.num_inflight -= 1
            if self.num_inflight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
