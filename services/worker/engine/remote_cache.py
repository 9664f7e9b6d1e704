"""The worker's KV blocks on memory servers: who uses each, and which hold a cached prefix. Pure Python.

Every spilled block is counted here by its users (sequences). A spilled block whose tokens are
known (its prefix hash, as in block_manager) is also registered: when its last user is done it is
not freed but kept, unused, on its memory server, and a later sequence whose prompt starts with the
same tokens takes it there instead of recomputing it. Partial attention reads it where it is, so a
cached remote prefix costs no transfer. This is what makes a long document's next question cheap:
its first blocks were spilled, and were freed with the request before.

Unused cached blocks still hold room on their servers. They are given up (evicted, least recently
used first) when this worker or another one needs that room to spill, when their server is lost,
and on reset; `remote_holdings` decides when. Blocks to free on their servers are returned, never freed
here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from services.worker.engine.remote import RemoteSpan


@dataclass(frozen=True, slots=True)
class RemoteBlock:
    memserver_id: str
    block_id: int
    epoch: int  # our epoch on that server when stored (RemoteSpan.epoch)


def blocks_of(spans: Iterable[RemoteSpan]) -> list[RemoteBlock]:
    return [RemoteBlock(s.memserver_id, b, s.epoch) for s in spans for b in s.block_ids]


def spans_of(blocks: list[RemoteBlock], start_token: int, block_size: int) -> list[RemoteSpan]:
    """Consecutive blocks (in token order, from start_token) grouped into spans, one per run on a server."""
    spans: list[RemoteSpan] = []
    run: list[RemoteBlock] = []
    for block in blocks:
        if run and (block.memserver_id, block.epoch) != (run[0].memserver_id, run[0].epoch):
            spans.append(RemoteSpan(run[0].memserver_id, tuple(b.block_id for b in run), start_token, run[0].epoch))
            start_token += len(run) * block_size
            run = []
        run.append(block)
    if run:
        spans.append(RemoteSpan(run[0].memserver_id, tuple(b.block_id for b in run), start_token, run[0].epoch))
    return spans


class RemoteBlockCache:
    def __init__(self, enable_caching: bool = True):
        self.enable_caching = enable_caching
        self._users: dict[RemoteBlock, int] = {}
        self._hash_of: dict[RemoteBlock, bytes] = {}
        self._block_of: dict[bytes, RemoteBlock] = {}
        self._evictable: OrderedDict[RemoteBlock, None] = OrderedDict()  # cached, unused; least recent first

    @property
    def num_blocks(self) -> int:
        """Blocks we hold on memory servers: in use, or cached and unused."""
        return len(self._users) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def held_per_memserver(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for block in (*self._users, *self._evictable):
            held[block.memserver_id] = held.get(block.memserver_id, 0) + 1
        return held

    def add(self, blocks: list[RemoteBlock]) -> None:
        """Blocks just stored for one sequence (one user each)."""
        for block in blocks:
            if block in self._users or block in self._evictable:
                raise RuntimeError(f"remote block {block} stored twice")
            self._users[block] = 1

    def register(self, block: RemoteBlock, block_hash: bytes) -> None:
        """block (in use) holds the tokens `block_hash` names. A hash already held keeps its block."""
        if not self.enable_caching or block_hash in self._block_of or block in self._hash_of:
            return
        if block not in self._users:
            raise RuntimeError(f"remote block {block} is not in use")
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block

    def num_cached(self, block_hashes: list[bytes]) -> int:
        """How many of the first `block_hashes` are cached here (taking nothing)."""
        num = 0
        while num < len(block_hashes) and block_hashes[num] in self._block_of:
            num += 1
        return num

    def match(self, block_hashes: list[bytes]) -> list[RemoteBlock]:
        """Take the cached blocks of the longest prefix of `block_hashes` (one use each)."""
        blocks = []
        for block_hash in block_hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            if block in self._evictable:
                del self._evictable[block]
                self._users[block] = 1
            else:
                self._users[block] += 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[RemoteBlock]) -> list[RemoteBlock]:
        """One use of each (a sequence's, in token order) is over; returns those to free on their
        servers (unused, not cached). A sequence's last blocks are evicted before its first: a
        prefix missing its head is of no use, one missing its tail still is."""
        gone = []
        for block in reversed(blocks):
            count = self._users.get(block, 0)
            if count < 1:
                raise RuntimeError(f"remote block {block} freed twice")
            if count > 1:
                self._users[block] = count - 1
                continue
            del self._users[block]
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                gone.append(block)
        gone.reverse()  # token order
        return gone

    def evict(self, num_blocks: int) -> list[RemoteBlock]:
        """Give up to num_blocks unused cached blocks, least recently used first; returns them."""
        gone = []
        while self._evictable and len(gone) < num_blocks:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            gone.append(block)
        return gone

    def forget(self, memserver_ids: set[str]) -> list[RemoteBlock]:
        """Those servers are lost (or leaving): nothing there may be matched again. Their unused
        blocks are returned (to release: repay the ledger, free where still reachable); blocks in
        use stay counted until their sequences (being recomputed) free them, and are then returned."""
        for block in [b for b in self._hash_of if b.memserver_id in memserver_ids]:
            del self._block_of[self._hash_of.pop(block)]
        gone = [b for b in self._evictable if b.memserver_id in memserver_ids]
        for block in gone:
            del self._evictable[block]
        return gone
