"""A memory server's request handlers: store blocks (received straight into the pool), partial
attention, free. Each transport session is bound to one owner (the worker that opened it); when
the session ends, the owner's blocks are freed."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import structlog
import torch

from services.memserver.messages import Attend, Attended, BlocksStored, FreeBlocks, Freed, FreeOwner, StoreBlocks
from services.memserver.pool import DTYPES, BlockPool, NotOwner, PoolError
from services.runtime.host import run_on_threads
from transport.client import Reply
from transport.server import Request

log = structlog.get_logger()


INLINE_MAX_KV_TOKENS = 65536  # decode attention over at most this many tokens runs on the event loop
# Decode calls over fewer KV tokens run on one thread: waking a second one costs more than it saves, and
# beside a worker on a 2-core host that thread waits for the core the worker's own local attention
# holds. 2 cores, 75% of an 8K context remote: its 6K-token calls took 449 us on 2 threads, 328 on
# 1; at 14K tokens 2 threads serve 0.77-0.97x of all-local decode speed against 0.73-0.87x.
PARALLEL_MIN_KV_TOKENS = 8192
# After answering a layer that is not the model's last, poll this long for the owner's next layer
# (it follows after that layer's local compute: ~0.3 ms for the tiny model on 2 CPU cores) rather
# than sleep in epoll: see transport.progress.Progress.linger.
NEXT_LAYER_LINGER_S = 0.002


class Leaving(PoolError):
    code = "leaving"


class BadAttend(PoolError):
    code = "bad_request"


class StaleEpoch(PoolError):
    code = "stale_epoch"


class MemoryService:
    def __init__(self, pool: BlockPool, num_threads: int = 1):
        self.pool = pool
        self.num_threads = num_threads  # torch threads for attention calls big enough to share
        self.leaving = False
        self._owner_of: dict[str, str] = {}  # transport session (peer) -> owner
        self._epochs: dict[str, int] = {}  # owner -> newest epoch seen (services.memserver.messages)
        # Attention runs off the event loop: a long prefill chunk must not stop this server from
        # answering its peers' liveness pings (they would declare it dead).
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memserver-attention")

    def close(self) -> None:
        self._compute.shutdown(wait=True)

    @property
    def handlers(self) -> dict:
        return {StoreBlocks: self.store, Attend: self.attend, FreeBlocks: self.free, FreeOwner: self.free_owner}

    def _bind(self, request: Request, owner: str) -> None:
        bound = self._owner_of.setdefault(request.peer, owner)
        if bound != owner:
            raise NotOwner(f"this connection belongs to {bound}, not {owner}")

    def _fence(self, owner: str, epoch: int) -> bool:
        """False for a message of an older epoch than the owner's newest; a newer epoch first
        frees what the owner left here under the older ones (it wrote those blocks off)."""
        current = self._epochs.get(owner)
        if current is not None and epoch < current:
            return False
        if current is not None and epoch > current:
            num = self.pool.free_owner(owner)
            if num:
                log.warning("owner_blocks_freed", owner=owner, num_blocks=num, reason="new epoch")
        self._epochs[owner] = epoch
        return True

    def _require_current(self, owner: str, epoch: int) -> None:
        if not self._fence(owner, epoch):
            raise StaleEpoch(f"epoch {epoch} of {owner} is stale; its blocks here were written off")

    def session_closed(self, peer: str) -> None:
        owner = self._owner_of.pop(peer, None)
        if owner is not None and owner not in self._owner_of.values():
            self._write_off(owner, "connection closed")

    def reap(self, live_owners: set[str]) -> None:
        """Free the blocks of owners the router no longer knows (their lease expired)."""
        for owner in list(self.pool.holdings()):
            if owner not in live_owners:
                self._write_off(owner, "lease expired")

    def _write_off(self, owner: str, reason: str) -> None:
        """Free an owner's blocks without its asking, and fence off its epoch. The owner may still
        be alive (frozen past its lease, cut off a while): until it writes these blocks off itself
        (a newer epoch), its messages under the old one are refused with stale_epoch. Accepted,
        its attention would find its blocks gone, and a store would be handed ids it still counts
        as its own (the worker's engine died of 'stored twice' in a chaos run)."""
        num = self.pool.free_owner(owner)
        if owner in self._epochs:
            self._epochs[owner] += 1  # the owner's next epoch is at least this (remote_client)
        if num:
            log.warning("owner_blocks_freed", owner=owner, num_blocks=num, reason=reason)

    async def store(self, request: Request) -> BlocksStored:
        msg: StoreBlocks = request.message
        if self.leaving:
            raise Leaving("this memory server is leaving; borrow elsewhere")
        self._bind(request, msg.owner)
        self._require_current(msg.owner, msg.epoch)
        num_frames = 2 * self.pool.geometry.num_layers
        if len(request.frame_sizes) != num_frames:
            raise PoolError(f"a store carries {num_frames} frames (K and V of each layer), got {len(request.frame_sizes)}")
        block_ids = self.pool.allocate(msg.owner, msg.num_blocks)
        try:
            buffers = self.pool.receive_buffers(block_ids)
            await request.recv_frames(buffers)
            self.pool.place(block_ids, buffers)
        except BaseException:
            self.pool.free(msg.owner, block_ids)
            raise
        log.debug("blocks_stored", owner=msg.owner, num_blocks=len(block_ids))
        return BlocksStored(tuple(block_ids))

    async def attend(self, request: Request) -> Reply:
        msg: Attend = request.message
        self._bind(request, msg.owner)
        self._require_current(msg.owner, msg.epoch)
        geo, kv = self.pool.geometry, self.pool.kv
        if msg.q_dtype != geo.q_dtype:
            raise BadAttend(f"q is {msg.q_dtype}; this pool's KV ({geo.dtype}) is attended in {geo.q_dtype}")
        q_dtype = DTYPES[geo.q_dtype]
        try:
            msg.check_frames(request.frame_sizes, geo.head_dim, q_dtype.itemsize)
        except ValueError as e:
            raise BadAttend(str(e)) from None
        q = torch.empty(msg.num_tokens, msg.num_heads, geo.head_dim, dtype=q_dtype, device=kv.device)
        tables = torch.empty(msg.num_seqs, msg.table_width, dtype=torch.int32)
        seq_lens = torch.empty(3, msg.num_seqs, dtype=torch.int32)
        await request.recv_frames([q, tables, seq_lens])
        args = (msg.owner, msg.layer, q, tables, seq_lens, msg.scale)
        kv_tokens = msg.num_seqs * msg.table_width * geo.block_size
        if msg.num_tokens == msg.num_seqs and kv_tokens <= INLINE_MAX_KV_TOKENS:
            # Small decode work (one query per sequence): milliseconds; a thread hop would only add latency.
            threads = self.num_threads if kv_tokens >= PARALLEL_MIN_KV_TOKENS else 1
            out, lse = run_on_threads(threads, self.num_threads, self.pool.attention, *args)
        else:
            out, lse = await asyncio.get_running_loop().run_in_executor(self._compute, self.pool.attention, *args)
        # The step's last layer ends this owner's burst: its next query comes after the step.
        request.linger(NEXT_LAYER_LINGER_S if msg.layer + 1 < geo.num_layers else 0)
        return Reply(Attended(), [out.contiguous(), lse.contiguous()])

    async def free(self, request: Request) -> Freed:
        msg: FreeBlocks = request.message
        self._bind(request, msg.owner)
        if not self._fence(msg.owner, msg.epoch):
            return Freed(0)  # freed already, when the newer epoch arrived
        return Freed(self.pool.free(msg.owner, msg.block_ids))

    async def free_owner(self, request: Request) -> Freed:
        msg: FreeOwner = request.message
        self._bind(request, msg.owner)
        if not self._fence(msg.owner, msg.epoch):
            return Freed(0)
        return Freed(self.pool.free_owner(msg.owner))
