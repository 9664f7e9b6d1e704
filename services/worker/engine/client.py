"""The worker front's handle on its engine process (services.worker.engine.core).

Same interface as AsyncEngine (generate / abort / stats / start / stop), so the HTTP app does not
know where the engine runs. The front never imports torch: the model lives in the child.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sys
from collections.abc import AsyncIterator

import structlog

from services.worker.engine import ipc
from services.worker.engine.api import (
    Delta, EngineError, EngineOverloaded, EngineStats, FinishReason, InvalidRequest,
)
from services.worker.engine.config import EngineConfig

log = structlog.get_logger()



class EngineStartFailed(RuntimeError):
    """The engine process could not load what it was given (model, adapters, chat template...);
    the message says why."""

class EngineDied(EngineOverloaded):
    code = "engine_unavailable"


class EngineProcess:
    def __init__(self, engine_config: EngineConfig, remote: dict | None = None, log_level: str = "info",
                 on_death=lambda: os._exit(1)):
        """remote: {"cluster_token", "router_url", "owner"} when KV may spill to memory servers.
        on_death: called shortly after the engine process dies unasked (default: end the worker
        with status 1, so the operator or kvmesh up sees it)."""
        self._config = {"engine": {f: getattr(engine_config, f) for f in engine_config.__slots__},
                        "remote_kv": remote is not None, **(remote or {})}
        self._log_level = log_level
        self._on_death = on_death
        self._queues: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}  # calls (tokenize, LoRA loads) awaiting the engine's answer
        self._call_ids = itertools.count()
        self._stats: EngineStats | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._dead: str | None = None
        self._stopping = False
        self.model_name = engine_config.model
        self.max_model_len = 0
        self.sampling_defaults: dict = {}
        self.lora_modules: dict[str, str] = {}  # the LoRA adapters loaded: name -> directory
        self.kv_geometry: dict | None = None
        self.eos_token_ids: list[int] = []

    async def start(self) -> None:
        """Spawn the engine and wait until its model is loaded (seconds); raises if it fails."""
        front, child = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.worker.engine.core", "--fd", str(child.fileno()),
                "--log-level", self._log_level, pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                env=_engine_env(os.environ),
            )
        finally:
            child.close()
        reader, self._writer = await asyncio.open_connection(sock=front)
        self._send(["config", self._config])
        unpacker = ipc.unpacker()
        ready = await self._first_message(reader, unpacker)
        if ready[0] != "ready":
            await self._proc.wait()
            raise EngineStartFailed(f"engine process failed to start: {ready[1]}")
        info = ready[1]
        self.model_name, self.max_model_len = info["model_name"], info["max_model_len"]
        self.kv_geometry, self._stats = info["kv_geometry"], ipc.stats_from_obj(info["stats"])
        self.sampling_defaults = info["sampling_defaults"]
        self.lora_modules = info["lora_modules"]
        self.eos_token_ids = info["eos_token_ids"]
        self._reader_task = asyncio.create_task(self._read(reader, unpacker), name="engine-reader")
        log.info("engine_process_started", pid=self._proc.pid)

    async def _first_message(self, reader: asyncio.StreamReader, unpacker) -> list:
        while True:
            for message in unpacker:
                return message
            data = await reader.read(1 << 20)
            if not data:
                return ["fatal", f"exited with status {await self._proc.wait()} before it was ready"]
            unpacker.feed(data)

    async def stop(self) -> None:
        if self._proc is None:
            return
        self._stopping = True
        if self._dead is None:
            self._send(["stop"])
        try:
            await asyncio.wait_for(self._proc.wait(), 30.0)
        except TimeoutError:
            log.warning("engine_process_killed", pid=self._proc.pid, reason="did not stop within 30 s")
            self._proc.kill()
            await self._proc.wait()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stats(self) -> EngineStats:
        return self._stats

    def update_kv_summary(self, kv: dict) -> None:
        if self._dead is None:
            self._send(["kv_summary", kv])

    async def generate(self, request) -> AsyncIterator[Delta]:
        if self._dead is not None:
            raise EngineDied(f"the engine process died: {self._dead}")
        if request.request_id in self._queues:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use", "request_id")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self._send(["submit", ipc.request_to_obj(request)])
            while True:
                item = await queue.get()
                if isinstance(item, EngineError):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished and self._dead is None:  # the caller went away: free its blocks at once
                self._send(["abort", request.request_id])
            self._queues.pop(request.request_id, None)

    async def tokenize(self, body: dict) -> dict:
        """LLMEngine.tokenize, answered by the engine between its steps."""
        return await self._call("tokenize", body)

    async def load_lora(self, name: str, path: str) -> dict[str, str]:
        """LLMEngine.load_lora; updates lora_modules (answers come, and resume their callers, in
        the engine's order, so the last one to set it is the newest)."""
        self.lora_modules = await self._call("load_lora", {"lora_name": name, "lora_path": path})
        return self.lora_modules

    async def unload_lora(self, name: str) -> dict[str, str]:
        self.lora_modules = await self._call("unload_lora", {"lora_name": name})
        return self.lora_modules

    async def reset_prefix_cache(self) -> dict[str, int]:
        """LLMEngine.reset_prefix_cache: how many cached blocks were forgotten, local and remote."""
        return await self._call("reset_prefix_cache", {})

    async def _call(self, kind: str, body: dict):
        """One of the engine's calls (core.EngineServer._answer), answered between its steps."""
        if self._dead is not None:
            raise EngineOverloaded(f"the engine process is gone: {self._dead}")
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._send(["call", call_id, kind, body])
            return await future
        finally:
            self._calls.pop(call_id, None)

    async def abort(self, request_id: str) -> None:
        if self._dead is None:
            self._send(["abort", request_id])

    def _send(self, message: list) -> None:
        self._writer.write(ipc.pack(message))

    async def _read(self, reader: asyncio.StreamReader, unpacker) -> None:
        try:
            while data := await reader.read(1 << 20):
                unpacker.feed(data)
                for message in unpacker:
                    self._dispatch(message)
            self._died(f"exited with status {await self._proc.wait()}")
        except (ConnectionError, ValueError) as e:
            self._died(repr(e))

    def _dispatch(self, message: list) -> None:
        kind = message[0]
        if kind == "step":
            for obj in message[1]:
                queue = self._queues.get(obj[0])
                if queue is not None:
                    queue.put_nowait(ipc.delta_from_obj(obj))
            self._stats = ipc.stats_from_obj(message[2])
        elif kind == "stats":
            self._stats = ipc.stats_from_obj(message[1])
        elif kind == "reject":
            _, request_id, code, text, param = message
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(ipc.error_from_reject(code, text, param))
        elif kind == "answer":
            _, call_id, result, error = message
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(ipc.error_from_reject(*error))
        elif kind == "fatal":
            self._died(message[1])

    def _died(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineOverloaded(f"the engine process died: {reason}"))
        if self._stopping:
            return
        log.error("engine_process_died", reason=reason, num_requests=len(self._queues))
        for request_id, queue in self._queues.items():  # every open stream ends with an error event
            queue.put_nowait(Delta(request_id, (), "", 0, 0, FinishReason.ERROR, error=f"engine process died: {reason}"))
        asyncio.get_running_loop().call_later(0.5, self._on_death)  # after the error events went out


def _engine_env(env) -> dict[str, str]:
    """The engine's environment: glibc malloc asks for transparent huge pages (where the kernel
    allows them on request, the default) so the weights streamed every step cost fewer TLB misses:
    a bf16 batch-1 decode step of the tiny model took 3.5-3.8 ms instead of 4.2-4.4 (lm_head
    1.3-1.45 -> 0.95-1.05 ms), in alternated runs. Read by glibc at process start, hence here.
    OpenMP likewise reads OMP_WAIT_POLICY at start: unless the operator set it, the threads that
    join only for the lm_head sleep when it ends instead of spinning on the core the event loops
    and memory servers need."""
    env = dict(env)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):  # an operator's choice wins
        env["GLIBC_TUNABLES"] = ":".join([*tunables, "glibc.malloc.hugetlb=1"])
    return env
