"""The worker's RemoteKV over the transport: borrow from the router's ledger, store blocks on
memory servers, partial attention there (services.worker.attend_client), free. Lives on the event
loop; the engine's step thread calls it through thread-safe futures."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import aiohttp
import structlog
import torch

from services.memserver.messages import FreeBlocks, FreeOwner, StoreBlocks
from services.runtime.auth import cluster_headers
from services.runtime.wire import CONTENT_TYPE, BorrowRequest, Repay, Settle, encode
from services.worker.attend_client import TRANSPORT_ERRORS as _TRANSPORT_ERRORS
from services.worker.attend_client import AttendClient
from services.worker.engine.remote import AttentionCall, RemoteSpan, SpillFailed
from transport.errors import PeerUnreachable, RemoteError
from transport.node import Node

log = structlog.get_logger()


class LedgerClient:
    """HTTP calls to the router's borrow ledger."""

    def __init__(self, session: aiohttp.ClientSession, router_url: str, token: str, owner: str):
        self._session = session
        self._base = router_url.rstrip("/") + "/internal/kv"
        self._headers = {**cluster_headers(token), "Content-Type": CONTENT_TYPE}
        self.owner = owner

    async def _post(self, path: str, data: bytes) -> tuple[int, dict]:
        async with self._session.post(self._base + path, data=data, headers=self._headers) as resp:
            return resp.status, await resp.json()

    async def borrow(self, num_blocks: int, near: tuple[str, ...] = (), need: int = 0) -> list[dict]:
        status, body = await self._post("/borrow", encode(BorrowRequest(self.owner, num_blocks, near, need)))
        if status != 200:
            raise SpillFailed(body.get("error", {}).get("message", f"borrow refused: HTTP {status}"))
        return body["grants"]

    async def settle(self, reservation_id: str, num_stored: int, unreachable: bool = False) -> None:
        await self._post("/settle", encode(Settle(self.owner, reservation_id, num_stored, unreachable)))

    async def summary(self) -> dict:
        async with self._session.get(self._base + "/summary", params={"worker_id": self.owner},
                                     headers=self._headers) as resp:
            return await resp.json() if resp.status == 200 else {}

    async def repay(self, memserver_id: str, num_blocks: int) -> None:
        await self._post("/repay", encode(Repay(self.owner, memserver_id, num_blocks)))


class RemoteKVClient:
    def __init__(self, loop: asyncio.AbstractEventLoop, node: Node, ledger: LedgerClient, timeout_s: float = 10.0,
                 attention_lane: bool = True):
        self._loop = loop
        self._node = node
        self._ledger = ledger
        self.owner = ledger.owner
        self._block_size = 0
        self._timeout = timeout_s
        self._free_hint = 0
        self._capacity_hint = 0
        self._reclaimable_hint = 0  # blocks other workers only cache
        self._reclaim = 0  # of our cached blocks, how many others need (taken once: take_reclaim)
        self._addresses: dict[str, str] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        # Our epoch on each memory server (services.memserver.messages). Starting at our start time
        # fences off whatever a predecessor under the same owner id left; it is raised when we write
        # a server's blocks off (it was lost: the engine recomputed our sequences there), and the
        # server frees them once it hears the new epoch: our next store there, or the write-off
        # sent as soon as the router lists it again (it may only have been silent a while).
        self._epoch_base = time.time_ns()
        self._epochs: dict[str, int] = {}
        self._written_off: set[str] = set()  # raised epochs the server has not acknowledged yet
        self._writing_off: dict[str, asyncio.Task] = {}
        # A generous deadline: a prefill chunk over many blocks can take seconds on a CPU memserver;
        # a dead or silent one is caught by the transport's liveness pings.
        self._attention = AttendClient(loop, node, self.owner, self._addresses, self._mark_lost, 6 * timeout_s,
                                       lane=attention_lane, epoch_of=self.epoch_of)

    def configure(self, geometry: dict) -> None:
        """The model's KV geometry, known once the engine has loaded it."""
        self._attention.scale = geometry["head_dim"] ** -0.5
        self._block_size = geometry["block_size"]

    # --- fed by the worker's heartbeat (event loop) ---
    def update(self, kv: dict) -> None:
        self._free_hint = int(kv.get("free_blocks", 0))
        self._capacity_hint = int(kv.get("capacity_blocks", 0))
        self._reclaimable_hint = int(kv.get("reclaimable_blocks", 0))
        self._reclaim = int(kv.get("reclaim", 0))
        self._addresses.update(kv.get("memservers", {}))
        for memserver_id in kv.get("leaving", []):
            self._mark_lost(memserver_id, "leaving")  # move off it: recompute what lives there
        with self._lock:
            due = [m for m in self._written_off if m in kv.get("memservers", {}) and m not in self._writing_off]
        for memserver_id in due:
            self._writing_off[memserver_id] = self._loop.create_task(self._write_off(memserver_id))

    async def refresh(self) -> None:
        """Ask the router now (a request is about to be refused for lack of room)."""
        try:
            kv = await self._ledger.summary()
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("kv_summary_failed", error=repr(e))
            return
        if kv:
            self.update(kv)

    def _mark_lost(self, memserver_id: str, reason: str) -> None:
        with self._lock:
            if memserver_id not in self._lost:
                log.warning("memserver_unusable", memserver=memserver_id, reason=reason)
            self._lost.add(memserver_id)

    # --- RemoteKV (engine's step thread) ---
    def free_blocks(self) -> int:
        # Blocks freed are added at once, and a heartbeat answer that already counts them may land
        # first: never more than the cluster has (a 1,025-token request was let in on a 1,024-token
        # cluster that way, capacity bench).
        return min(self._free_hint, self._capacity_hint) if self._capacity_hint else self._free_hint

    def reclaimable_blocks(self) -> int:
        return self._reclaimable_hint

    def capacity_blocks(self) -> int:
        return self._capacity_hint

    def take_reclaim(self) -> int:
        reclaim, self._reclaim = self._reclaim, 0
        return reclaim

    def lost_memservers(self) -> set[str]:
        with self._lock:
            lost, self._lost = self._lost, set()
            for memserver_id in lost:  # the engine recomputes every sequence there: write our blocks off
                self._epochs[memserver_id] = max(self.epoch_of(memserver_id) + 1, time.time_ns())
                self._written_off.add(memserver_id)
        return lost

    def epoch_of(self, memserver_id: str) -> int:
        return self._epochs.get(memserver_id, self._epoch_base)

    def _acknowledged(self, memserver_id: str, epoch: int) -> None:
        with self._lock:
            if self.epoch_of(memserver_id) == epoch:
                self._written_off.discard(memserver_id)

    def spill(self, request_id: str, kv: torch.Tensor, start_token: int, near: tuple[str, ...] = (),
              need: int = 0) -> list[RemoteSpan]:
        future = asyncio.run_coroutine_threadsafe(self._spill(request_id, kv, start_token, near, need), self._loop)
        try:
            return future.result(timeout=self._timeout * 3)
        except TimeoutError as e:
            future.cancel()
            raise SpillFailed(f"spill of {kv.shape[2]} blocks timed out") from e

    def release(self, spans: list[RemoteSpan]) -> Future:
        return asyncio.run_coroutine_threadsafe(self._release(list(spans)), self._loop)

    def submit_attention(self, calls: list[tuple[str, AttentionCall]]) -> list:
        return self._attention.submit(calls)

    # --- on the event loop ---
    async def _spill(self, request_id: str, kv: torch.Tensor, start_token: int, near: tuple[str, ...],
                     need: int) -> list[RemoteSpan]:
        # kv: [num_layers, 2, n, block_size, Hkv, D]; a store sends K and V of each layer as frames
        spans: list[RemoteSpan] = []
        num_blocks, layer_kv = kv.shape[2], kv.flatten(0, 1)  # [2 * num_layers, n, ...]
        done, attempts = 0, 0
        while done < num_blocks:
            attempts += 1
            if attempts > 3:
                await self._release(spans)
                await self.refresh()
                raise SpillFailed(f"memory servers refused {num_blocks - done} of {num_blocks} blocks")
            try:
                holding = tuple(dict.fromkeys((*near, *(s.memserver_id for s in spans))))
                grants = await self._ledger.borrow(num_blocks - done, holding, max(0, need - done))
            except (aiohttp.ClientError, TimeoutError) as e:
                raise SpillFailed(f"router unreachable: {e!r}") from e
            except SpillFailed:
                await self._release(spans)
                await self.refresh()
                raise
            for grant in grants:
                n = grant["num_blocks"]
                self._addresses[grant["memserver_id"]] = grant["address"]
                epoch = self.epoch_of(grant["memserver_id"])
                try:
                    conn = await self._node.pool.get(grant["address"])
                    reply = await conn.request(StoreBlocks(self.owner, n, epoch), [f[done:done + n] for f in layer_kv],
                                               timeout=self._timeout)
                except _TRANSPORT_ERRORS as e:
                    log.warning("store_refused", request_id=request_id, memserver=grant["memserver_id"], error=str(e))
                    if not isinstance(e, RemoteError) or e.code == "stale_epoch":
                        # Unreachable mid-store, it may have taken the blocks without our hearing of
                        # it (they would stay held for us); or it freed ours unasked (our lease
                        # expired while we were silent). Either way: recompute what lived there and
                        # move to a newer epoch, as for a lost server.
                        self._mark_lost(grant["memserver_id"], str(e))
                    # Unreachable, not full: the ledger lends nothing more from it until it heartbeats.
                    await self._ledger.settle(grant["reservation_id"], 0, isinstance(e, PeerUnreachable))
                    continue
                await self._ledger.settle(grant["reservation_id"], n)
                self._acknowledged(grant["memserver_id"], epoch)  # the store's epoch fenced off older blocks
                spans.append(RemoteSpan(grant["memserver_id"], tuple(reply.message.block_ids),
                                        start_token + done * self._block_size, epoch))
                done += n
        return spans

    async def _release(self, spans: list[RemoteSpan]) -> None:
        by_server: dict[tuple[str, int], list[int]] = {}
        for span in spans:
            by_server.setdefault((span.memserver_id, span.epoch), []).extend(span.block_ids)
        for (memserver_id, epoch), block_ids in sorted(by_server.items()):
            address = self._addresses.get(memserver_id)
            freed = False
            try:
                if address is not None:
                    conn = await self._node.pool.get(address)
                    await conn.request(FreeBlocks(self.owner, tuple(block_ids), epoch), timeout=self._timeout)
                    freed = True
            except _TRANSPORT_ERRORS as e:
                log.info("free_failed", memserver=memserver_id, num_blocks=len(block_ids), error=str(e))
                if not isinstance(e, RemoteError):
                    # Unreachable: dead (its blocks are gone) or only silent a while (a frozen host),
                    # and then it still holds them for us. Written off under a newer epoch, they are
                    # freed once it answers; else they stayed held for good (32 blocks, chaos).
                    self._mark_lost(memserver_id, str(e))
            try:
                await self._ledger.repay(memserver_id, len(block_ids))
                if freed:  # lendable again now; the next heartbeat re-bases the hint
                    self._free_hint += len(block_ids)
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("repay_failed", memserver=memserver_id, error=repr(e))

    async def _write_off(self, memserver_id: str) -> None:
        """Tell a server we wrote off (and that the router lists again) that our blocks there of
        older epochs are garbage: a free of no blocks under the new epoch is the fence alone."""
        epoch = self.epoch_of(memserver_id)
        try:
            conn = await self._node.pool.get(self._addresses[memserver_id])
            await conn.request(FreeBlocks(self.owner, (), epoch), timeout=self._timeout)
        except _TRANSPORT_ERRORS as e:  # still unreachable: the next heartbeat tries again
            log.info("write_off_failed", memserver=memserver_id, error=str(e))
            return
        finally:
            self._writing_off.pop(memserver_id, None)
        self._acknowledged(memserver_id, epoch)
        log.info("blocks_written_off", memserver=memserver_id, epoch=epoch)

    async def close(self) -> None:
        """Free everything we hold everywhere (clean shutdown, once the engine stopped stepping)."""
        for task in list(self._writing_off.values()):
            task.cancel()
        await self._attention.close()
        for memserver_id, address in sorted(self._addresses.items()):
            try:
                conn = await self._node.pool.get(address)
                await conn.request(FreeOwner(self.owner, self.epoch_of(memserver_id)), timeout=2.0)
            except _TRANSPORT_ERRORS:
                pass

