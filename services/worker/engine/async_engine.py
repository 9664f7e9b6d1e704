"""asyncio front of the engine: steps run on one background thread so the event loop stays free
for I/O; each request's deltas reach its caller through its own queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import structlog

from services.worker.engine.api import Delta, EngineStats, GenerateRequest, InvalidRequest
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine

log = structlog.get_logger()


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self.engine = engine if engine is not None else LLMEngine(config)
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.sampling_defaults = self.engine.sampling_defaults
        self._queues: dict[str, asyncio.Queue[Delta]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-step")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        for request_id in list(self._queues):
            self.engine.abort(request_id)
        if self._task is not None:
            self._wakeup.set()
            # Let the loop deliver the abort deltas (and free the blocks) before it stops.
            for _ in range(100):
                if not self.engine.has_work():
                    break
                await asyncio.sleep(0.01)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def tokenize(self, body: dict) -> dict:
        return self.engine.tokenize(body)  # the tokenizer is thread-safe; a prompt's worth is quick

    @property
    def lora_modules(self) -> dict[str, str]:
        return self.engine.lora_modules

    async def load_lora(self, name: str, path: str) -> dict[str, str]:
        return self.engine.load_lora(name, path)  # admission reads the adapters under the GIL: a dict insert

    async def unload_lora(self, name: str) -> dict[str, str]:
        return self.engine.unload_lora(name)

    @property
    def kv_geometry(self) -> dict:
        return self.engine.kv_geometry

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if request.request_id in self._queues:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use", "request_id")
        active = self.engine.prepare(request)
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self.engine.submit(active)
            self._wakeup.set()
            while True:
                delta = await queue.get()
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            if not finished:  # the caller went away: free the request's blocks at once
                self.engine.abort(request.request_id)
                self._wakeup.set()
            self._queues.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work():
                self._wakeup.clear()
                if not self.engine.has_work():
                    await self._wakeup.wait()
                continue
            if (delay := self.engine.ready_in()) > 0:  # all it has backs off: wait, or a new request
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                continue
            try:
                deltas = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as e:
                log.exception("engine_step_failed", error=str(e))
                deltas = await loop.run_in_executor(self._executor, self.engine.fail_all, f"engine step failed: {e}")
            for delta in deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
