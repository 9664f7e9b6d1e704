"""The step thread's own path to memory servers, for the per-layer attention requests.

A private event loop and UCX node, run only by the thread that steps the model and only while it
waits for a reply: a request leaves from that thread as soon as the layer's queries exist, and the
reply wakes that thread directly. Through the worker's event loop instead, every layer paid two
thread hand-offs (step thread -> loop to send, loop -> step thread on the reply) and the GIL
traffic between them: ~300 us of a ~2 ms remote layer on a loaded 2-core host. Spills, frees and
the ledger stay on the worker's loop (services.worker.remote_client).

The lane's loop is asyncio's own selector loop, not uvloop: it runs once per wait, and uvloop's
``run_until_complete`` in a process's main thread (the engine's step thread is one) sets up and
tears down its signal wake-up socket pair on every run: a 3-frame round trip took ~280 us instead
of ~120 us (1 KiB inline frames each way, 2-core VM), ~150-280 us of each remote layer.

Between steps nothing runs here: a peer that died meanwhile is found on the next request (its
endpoint errors, or the liveness pings of the transport find it silent while the step waits).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Sequence

from transport.client import Reply
from transport.config import TransportConfig
from transport.errors import PeerUnreachable
from transport.node import Node


# A reply later than this (a long prefill chunk's attention) is waited for asleep in epoll.
_POLL_S = 0.02


class AttentionLane:
    """Used by one thread (``owner``, the first caller); ``close`` from any thread once it stopped."""

    def __init__(self, config: TransportConfig):
        self._config = config
        self.owner = threading.get_ident()
        self._lock = threading.Lock()  # the owner runs the loop; close waits for it to finish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._node: Node | None = None
        self._closed = False

    def usable_here(self) -> bool:
        """The calling thread owns the lane and runs no event loop of its own."""
        if threading.get_ident() != self.owner or self._closed:
            return False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return True
        return False

    def request(self, address: str, message: Any, frames: Sequence[Any], *, into: Sequence[Any],
                timeout: float) -> asyncio.Future:
        """Post a request now and return the future of its Reply (``wait`` for it). Dials first
        when there is no connection to ``address``. Raises the transport's errors."""
        with self._lock:
            if self._closed:
                raise PeerUnreachable("attention lane closed")
            loop = self._started()
            conn = self._node.pool.peek(address) or loop.run_until_complete(self._node.pool.get(address))
            sent: list[asyncio.Future] = []
            reply = conn.start_request(message, frames, into=into, timeout=timeout, sent=sent)
            reply.add_done_callback(_retrieve)  # one never waited for (the step failed) logs nothing
            if sent:  # tagged frames: a rendezvous needs this side's progress to move the data
                loop.run_until_complete(asyncio.wait(sent))
            return reply

    def wait(self, reply: asyncio.Future) -> Reply:
        """Run the lane until ``reply`` is done; its Reply, or the transport error it failed with.
        The thread polls for it (yielding its core between polls) rather than sleeping in epoll:
        it has nothing else to do, and the reply then finds it awake (see Progress.linger)."""
        with self._lock:
            if not reply.done():
                if self._loop is None:
                    raise PeerUnreachable("attention lane closed")
                # Until this reply: another memory server's reply may come first.
                self._node.linger(_POLL_S, any_message=False)
                try:
                    self._loop.run_until_complete(reply)  # a future, not a coroutine: no task
                finally:
                    self._node.linger(0)
        return reply.result()

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.SelectorEventLoop()
            try:
                self._node = loop.run_until_complete(Node.start(self._config))
            except BaseException:
                loop.close()
                raise
            self._loop = loop
        return self._loop

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._loop is None:
                return
            loop, self._loop = self._loop, None
            try:
                loop.run_until_complete(self._node.close())
                loop.run_until_complete(asyncio.sleep(0))  # let the cancelled liveness tasks finish
            finally:
                loop.close()


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
