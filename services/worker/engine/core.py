"""The engine process: steps the model back to back, apart from the worker's HTTP front.

Why a process of its own: in one process the step thread and the event loop that streams tokens
share the GIL, and the step thread waited for the loop between steps (p50 gap 1-3 ms per ~8 ms
step at 16 streams on 2 cores). Here the main thread only steps; it reads requests from the front
between steps, and sends each step's deltas (and the block accounting) back as one message.

    python -m services.worker.engine.core --fd N   (started by services.worker.engine.client)

It exits when the front says stop or its socket closes (the front died: kill -9 included), so an
engine never outlives its worker. Signals are left to the front, which drains first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future

import structlog
import uvloop

from services.runtime.host import keep_freed_memory
from services.runtime.logging import configure_logging
from services.worker.engine import ipc
from services.worker.engine.api import (
    ContextLengthExceeded, EngineError, EngineOverloaded, GenerateRequest, InvalidRequest, KVCapacityBusy,
)
from services.worker.engine.config import EngineConfig
from services.worker.model.errors import ModelError

log = structlog.get_logger()


class Channel:
    """Blocking writes, non-blocking reads of msgpack messages on the front's socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(True)
        self._unpacker = ipc.unpacker()
        self.closed = False

    def send(self, message: list) -> None:
        try:
            self.sock.sendall(ipc.pack(message))
        except OSError:
            self.closed = True

    def receive(self, timeout: float | None) -> list[list]:
        """Messages already sent; waits up to timeout (None: forever) when there are none yet."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        while ready:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            self._unpacker.feed(data)
            ready, _, _ = select.select([self.sock], [], [], 0)
        return list(self._unpacker)


class RemoteLoop:
    """The UCX node and ledger client of remote KV, on an event loop thread of this process."""

    def __init__(self, token: str, router_url: str, owner: str):
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvmesh-remote", daemon=True)
        self._thread.start()
        self.client = self.call(self._open(token, router_url, owner), timeout=60.0)

    def call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _open(self, token: str, router_url: str, owner: str):
        import aiohttp

        from services.worker.remote_client import LedgerClient, RemoteKVClient
        from transport.config import TransportConfig
        from transport.node import Node

        self._node = await Node.start(TransportConfig.from_env(token=token.encode()))
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0))
        ledger = LedgerClient(self._session, router_url, token, owner)
        return RemoteKVClient(asyncio.get_running_loop(), self._node, ledger)

    def close(self) -> None:
        async def close():
            await self.client.close()
            await self._node.close()
            await self._session.close()

        try:
            self.call(close(), timeout=10.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5.0)


class EngineServer:
    def __init__(self, channel: Channel, engine, remote: RemoteLoop | None):
        self.channel = channel
        self.engine = engine
        self.remote = remote
        self._stopping = False
        self._last_stats = None
        # Requests whose structured output compiles on the grammar thread: (request, Future), in order
        self._compiling: list[tuple[GenerateRequest, Future]] = []

    def run(self) -> None:
        while not self.channel.closed:
            for message in self.channel.receive(timeout=self._wait_s()):
                self._handle(message)
            if self._compiling:
                self._admit_compiled()
            if self.engine.has_work() and self.engine.ready_in() == 0:
                self.channel.send(["step", [ipc.delta_to_obj(d) for d in self._step()], self._stats()])
            elif self._stopping and not self.engine.has_work():
                return
            else:  # nothing runs, or all it has backs off: what a step would do meanwhile
                self.engine.tend()
                last = self._last_stats
                stats = self._stats()
                if stats != last:  # e.g. an abort freed blocks, or cached ones went, while nothing runs
                    self.channel.send(["stats", stats])

    def _wait_s(self) -> float | None:
        """How long to wait for the front's messages before the next turn (None: until one comes)."""
        # Busy, it steps at once, unless all it has waits out a backoff (engine.ready_in). While
        # grammars compile, it looks for finished ones every 5 ms even when nothing else runs; with
        # memory servers, for lost ones every 250 ms (engine.tend): one that held our blocks, or one
        # a free could not reach (it must be written off even with none left).
        if self.engine.has_work():
            return min(self.engine.ready_in(), 0.005 if self._compiling else 0.05)
        if self._compiling:
            return 0.005
        if self._stopping:
            return 0.05
        return 0.25 if self.engine.remote is not None else None

    def _stats(self) -> list:
        self._last_stats = ipc.stats_to_obj(self.engine.stats())
        return self._last_stats

    def _step(self):
        try:
            return self.engine.step()
        except Exception as e:  # one bad step fails its requests, not the worker
            log.exception("engine_step_failed", error=str(e))
            return self.engine.fail_all(f"engine step failed: {e}")

    def _answer(self, name: str, body: dict):
        """EngineProcess._call's: the front's calls that are not requests."""
        if name == "tokenize":
            return self.engine.tokenize(body)
        if name == "load_lora":
            return self.engine.load_lora(body["lora_name"], body["lora_path"])
        if name == "unload_lora":
            return self.engine.unload_lora(body["lora_name"])
        if name == "reset_prefix_cache":
            return self.engine.reset_prefix_cache()
        raise InvalidRequest(f"unknown engine call {name!r}")

    def _handle(self, message: list) -> None:
        kind = message[0]
        if kind == "submit":
            self._submit(ipc.request_from_obj(message[1]))
        elif kind == "abort":
            self._compiling = [(r, f) for r, f in self._compiling if r.request_id != message[1]]
            self.engine.abort(message[1])
        elif kind == "call":
            _, call_id, name, body = message
            try:
                self.channel.send(["answer", call_id, self._answer(name, body), None])
            except EngineError as e:
                self.channel.send(["answer", call_id, None, ipc.reject_message("", e)[2:]])
        elif kind == "kv_summary" and self.remote is not None:
            self.remote.loop.call_soon_threadsafe(self.remote.client.update, message[1])
        elif kind == "stop":
            self._stopping = True
            for request, _ in self._compiling:  # not started: another worker can take it (503)
                self.channel.send(ipc.reject_message(request.request_id, EngineOverloaded(
                    "the worker is stopping; this request had not started")))
            self._compiling = []
            for request_id in list(self.engine.active_request_ids()):
                self.engine.abort(request_id)

    def _submit(self, request: GenerateRequest) -> None:
        if request.sampling.structured is not None:  # admitted once its grammar has compiled
            self._compiling.append((request, self.engine.grammars.compile_async(request.sampling.structured)))
            return
        self._admit(request)

    def _admit_compiled(self) -> None:
        waiting = []
        for request, future in self._compiling:
            if not future.done():
                waiting.append((request, future))
                continue
            try:
                grammar = future.result()
            except EngineError as e:
                self.channel.send(ipc.reject_message(request.request_id, e))
                continue
            except Exception as e:  # a grammar library failure fails this request, not the engine
                log.exception("grammar_compile_failed", request_id=request.request_id, error=str(e))
                error = InvalidRequest(f"the structured output could not be compiled: {e}",
                                       request.sampling.structured.param)
                self.channel.send(ipc.reject_message(request.request_id, error))
                continue
            self._admit(request, grammar)
        self._compiling = waiting

    def _admit(self, request: GenerateRequest, grammar=None) -> None:
        try:
            try:
                active = self.engine.prepare(request, grammar)
            except (ContextLengthExceeded, KVCapacityBusy):
                if self.remote is None:
                    raise
                # Memory servers may have joined, or freed blocks, since the last heartbeat: look again
                # before refusing.
                self.remote.call(self.remote.client.refresh(), timeout=15.0)
                active = self.engine.prepare(request, grammar)
        except EngineError as e:
            self.channel.send(ipc.reject_message(request.request_id, e))
            return
        self.engine.submit(active)


def _build(config: dict):
    from services.worker.engine.llm_engine import LLMEngine

    engine_config = EngineConfig(**config["engine"])
    remote = None
    if config.get("remote_kv"):
        remote = RemoteLoop(config["cluster_token"], config["router_url"], config["owner"])
    try:
        engine = LLMEngine(engine_config, remote=remote.client if remote is not None else None)
    except BaseException:
        if remote is not None:
            remote.close()
        raise
    if remote is not None:
        remote.client.configure(engine.kv_geometry)
    return engine, remote


def main() -> int:
    parser = argparse.ArgumentParser(prog="kvmesh engine")
    parser.add_argument("--fd", type=int, required=True, help="socket to the worker front")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    configure_logging("engine", args.log_level)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the front drains, then tells us to stop
        signal.signal(sig, signal.SIG_IGN)
    keep_freed_memory()  # each layer's MiB-sized K/V gathers reuse the heap instead of faulting in
    channel = Channel(socket.socket(fileno=args.fd))
    messages = []
    while not messages and not channel.closed:
        messages = channel.receive(timeout=None)
    if channel.closed:
        return 1
    started = time.perf_counter()
    log.info("engine_loading", pid=os.getpid())
    try:
        engine, remote = _build(messages[0][1])
    except ModelError as e:  # the message says what to change; a traceback adds nothing
        log.error("engine_start_failed", error=str(e))
        channel.send(["fatal", f"{type(e).__name__}: {e}"])
        return 1
    except Exception as e:
        log.exception("engine_start_failed", error=str(e))
        channel.send(["fatal", f"{type(e).__name__}: {e}"])
        return 1
    channel.send(["ready", {"model_name": engine.model_name, "max_model_len": engine.max_model_len,
                            "kv_geometry": engine.kv_geometry, "stats": ipc.stats_to_obj(engine.stats()),
                            "sampling_defaults": engine.sampling_defaults, "lora_modules": engine.lora_modules,
                            "eos_token_ids": list(engine.tokenizer.eos_token_ids)}])
    log.info("engine_ready", load_s=round(time.perf_counter() - started, 2))
    server = EngineServer(channel, engine, remote)
    for message in messages[1:]:
        server._handle(message)
    try:
        server.run()
    finally:
        if remote is not None:
            remote.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
