"""Partial attention on memory servers: one Attend request per memory server per layer, with the
queries of every sequence that has blocks there. The step thread sends on its own lane
(services.worker.attention_lane); another caller (a thread running an event loop, or with the lane
off) goes through the worker's event loop, by plain callbacks. Either way a transport failure
becomes MemserverLost, and the memory server is reported lost."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Callable

import torch

from services.memserver.messages import Attend
from services.worker.attention_lane import AttentionLane
from services.worker.engine.remote import AttentionCall, MemserverLost
from transport.errors import PeerUnreachable, RemoteError, TransferTimeout, WireDecodeError
from transport.node import Node

TRANSPORT_ERRORS = (PeerUnreachable, TransferTimeout, RemoteError, WireDecodeError)


class AttendClient:
    def __init__(self, loop: asyncio.AbstractEventLoop, node: Node, owner: str, addresses: dict[str, str],
                 mark_lost: Callable[[str, str], None], timeout_s: float, lane: bool = True,
                 epoch_of: Callable[[str], int] = lambda memserver_id: 0):
        self._loop = loop
        self._node = node
        self.owner = owner
        self.scale = 1.0  # head_dim ** -0.5, set once the model is known
        self._addresses = addresses  # memserver id -> transport address, kept up to date by the owner
        self._epoch_of = epoch_of  # memserver id -> our epoch there (services.memserver.messages)
        self._mark_lost = mark_lost
        self._timeout = timeout_s
        self._use_lane = lane
        self._lane: AttentionLane | None = None  # created by the first caller without an event loop

    def submit(self, calls: list[tuple[str, AttentionCall]]) -> list:
        """Start one layer's requests; one future each (``result()`` gives (out, lse) or raises
        MemserverLost)."""
        lane = self._lane_here()
        if lane is not None:
            return [self._lane_attend(lane, memserver_id, call) for memserver_id, call in calls]
        results = [Future() for _ in calls]
        self._loop.call_soon_threadsafe(self._post_all, calls, results)
        return results

    async def close(self) -> None:
        """Once nothing steps any more."""
        if self._lane is not None:
            await asyncio.to_thread(self._lane.close)

    def _request(self, memserver_id: str, call: AttentionCall) -> tuple[Attend, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(message, frames, out, lse): the request of one layer and the buffers its reply lands in."""
        num_tokens, num_heads, _ = call.q.shape
        out = torch.empty_like(call.q)
        lse = torch.empty(num_tokens, num_heads, dtype=torch.float32)
        num_seqs, width = call.block_tables.shape
        message = Attend(self.owner, call.layer, num_heads, self.scale, str(call.q.dtype).removeprefix("torch."),
                         num_tokens, num_seqs, width, self._epoch_of(memserver_id))
        return message, [call.q, call.block_tables, call.seq_lens], out, lse

    def lost(self, memserver_id: str, error: Exception) -> MemserverLost:
        self._mark_lost(memserver_id, str(error))
        lost = MemserverLost(memserver_id, str(error))
        lost.__cause__ = error
        return lost

    # --- the step thread's lane ---
    def _lane_here(self) -> AttentionLane | None:
        if not self._use_lane:
            return None
        if self._lane is None:
            try:
                asyncio.get_running_loop()
                return None  # a thread with a loop of its own is no step thread
            except RuntimeError:
                self._lane = AttentionLane(self._node.config)
        return self._lane if self._lane.usable_here() else None

    def _lane_attend(self, lane: AttentionLane, memserver_id: str, call: AttentionCall):
        address = self._addresses.get(memserver_id)
        if address is None:
            return _failed(MemserverLost(memserver_id, "address unknown"))
        message, frames, out, lse = self._request(memserver_id, call)
        try:
            reply = lane.request(address, message, frames, into=[out, lse], timeout=self._timeout)
        except TRANSPORT_ERRORS as e:
            return _failed(self.lost(memserver_id, e))
        return _LaneResult(self, lane, memserver_id, reply, out, lse)

    # --- through the worker's event loop (on the loop) ---
    def _post_all(self, calls: list[tuple[str, AttentionCall]], results: list[Future]) -> None:
        for (memserver_id, call), result in zip(calls, results):
            self._post(memserver_id, call, result)

    def _post(self, memserver_id: str, call: AttentionCall, result: Future) -> None:
        """Post on a live connection and settle ``result`` from the reply's callback (no task);
        dial first (a task) when there is no connection yet."""
        address = self._addresses.get(memserver_id)
        conn = self._node.pool.peek(address) if address is not None else None
        if conn is None:
            task = self._loop.create_task(self._dial_and_attend(memserver_id, call))
            task.add_done_callback(lambda t: self._settle(memserver_id, t, t.result, result))
            return
        try:
            message, frames, out, lse = self._request(memserver_id, call)
            reply = conn.start_request(message, frames, into=[out, lse], timeout=self._timeout)
        except TRANSPORT_ERRORS as e:
            result.set_exception(self.lost(memserver_id, e))
            return
        except Exception as e:  # a bug (e.g. unsendable frames): that step fails, never waits forever
            result.set_exception(e)
            return
        reply.add_done_callback(lambda r: self._settle(memserver_id, r, lambda: (out, lse), result))

    def _settle(self, memserver_id: str, done: asyncio.Future, value: Callable[[], object], result: Future) -> None:
        """Settle ``result`` from a finished reply or dial task: ``value()``, or its failure (a
        transport error becomes MemserverLost and reports the memory server lost)."""
        try:
            if done.cancelled():
                result.set_exception(MemserverLost(memserver_id, "request cancelled"))
            elif (error := done.exception()) is None:
                result.set_result(value())
            elif isinstance(error, TRANSPORT_ERRORS):
                result.set_exception(self.lost(memserver_id, error))
            else:
                result.set_exception(error)
        except Exception as e:  # a bug here must fail the step, not leave it waiting forever
            if not result.done():
                result.set_exception(e)
            raise

    async def _dial_and_attend(self, memserver_id: str, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Dial, then attend; transport errors are left to ``_settle``."""
        address = self._addresses.get(memserver_id)
        if address is None:
            raise MemserverLost(memserver_id, "address unknown")
        message, frames, out, lse = self._request(memserver_id, call)
        conn = await self._node.pool.get(address)
        await conn.request(message, frames, into=[out, lse], timeout=self._timeout)
        return out, lse


class _LaneResult:
    """A request on the step thread's lane: ``result()`` runs the lane until the reply is in."""

    __slots__ = ("_client", "_lane", "_memserver_id", "_reply", "_out", "_lse")

    def __init__(self, client: AttendClient, lane: AttentionLane, memserver_id: str, reply: asyncio.Future,
                 out: torch.Tensor, lse: torch.Tensor):
        self._client, self._lane, self._memserver_id = client, lane, memserver_id
        self._reply, self._out, self._lse = reply, out, lse

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            self._lane.wait(self._reply)
        except TRANSPORT_ERRORS as e:
            raise self._client.lost(self._memserver_id, e) from e
        except asyncio.CancelledError as e:
            raise MemserverLost(self._memserver_id, "request cancelled") from e
        return self._out, self._lse


def _failed(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future
