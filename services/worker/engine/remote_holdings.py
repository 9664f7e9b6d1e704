"""The scheduler's side of the worker's KV on memory servers: what it holds there (remote_cache),
how much room the cluster has for its spills, and which blocks to free. Pure Python: the engine does
the I/O (RemoteKV), fed from `released` after each step.

Room, for spilling and admission, is the blocks the cluster could lend now, plus the cached blocks no
sequence uses (ours are given up when a spill needs them; other workers give theirs up when the
ledger refuses us and asks them), as far as the last heartbeat says.
"""

from __future__ import annotations

from collections.abc import Callable

from services.worker.engine.remote import RemoteSpan
from services.worker.engine.remote_cache import RemoteBlock, RemoteBlockCache, blocks_of, spans_of

_Hint = Callable[[], int] | None


class RemoteHoldings:
    def __init__(self, block_size: int, enable_caching: bool = True, free_blocks: _Hint = None,
                 reclaimable: _Hint = None, take_reclaim: _Hint = None, capacity: _Hint = None):
        """free_blocks: what the cluster could lend now (None: no memory servers for us);
        reclaimable: other workers' cached blocks there; take_reclaim: how many of ours other
        workers need (each heartbeat's figure once); capacity: every block the lending servers
        have - RemoteKV's free_blocks, reclaimable_blocks, take_reclaim, capacity_blocks."""
        self.block_size = block_size
        self.cache = RemoteBlockCache(enable_caching)
        self._free_blocks = free_blocks
        self._reclaimable = reclaimable
        self._take_reclaim = take_reclaim
        self._capacity = capacity
        self.released: list[RemoteSpan] = []  # to free on their servers: the engine takes them
        self.num_evicted_for_spill = 0  # this step's: the engine frees them before it spills

    @property
    def usable(self) -> bool:
        return self._free_blocks is not None

    def free_blocks(self) -> int:
        return self._free_blocks() if self._free_blocks is not None else 0

    def room(self) -> int:
        if self._free_blocks is None:
            return 0
        return self._free_blocks() + self.cache.num_evictable + self.others_reclaimable()

    def capacity(self) -> int:
        """Every block of the lending memory servers, in use or not (0: none known)."""
        return self._capacity() if self._capacity is not None else 0

    def others_reclaimable(self) -> int:
        """Other workers' cached blocks there: theirs until a refused borrow of ours makes the
        ledger ask them to give them up."""
        return self._reclaimable() if self._reclaimable is not None else 0

    def new_step(self) -> None:
        self.num_evicted_for_spill = 0
        self.answer_reclaim()

    def answer_reclaim(self) -> None:
        """Other workers' sequences come before our cached prefixes too: give up what the ledger
        says they could not borrow."""
        if self._take_reclaim is not None:
            self.give_up(self._take_reclaim())

    def evict_for_spill(self, num_blocks: int) -> int:
        num = self.give_up(num_blocks)
        self.num_evicted_for_spill += num
        return num

    def give_up(self, num_blocks: int) -> int:
        """Release up to num_blocks of our cached blocks nobody uses (least recently used first)."""
        gone = self.cache.evict(num_blocks) if num_blocks > 0 else []
        self._give_back(gone)
        return len(gone)

    def num_cached(self, block_hashes: list[bytes]) -> int:
        return self.cache.num_cached(block_hashes)

    def take_prefix(self, block_hashes: list[bytes]) -> list[RemoteSpan]:
        """The cached blocks of these (a prefix's first blocks, all cached), one use each, as spans."""
        return spans_of(self.cache.match(block_hashes), 0, self.block_size)

    def stored(self, spans: list[RemoteSpan], block_hashes: list[bytes]) -> None:
        """A sequence's blocks now live in `spans` (one use each); those whose tokens are known
        (block_hashes: the sequence's, from its first block) are cached, for later prefixes."""
        for span in spans:
            blocks = blocks_of([span])
            self.cache.add(blocks)
            for j, block in enumerate(blocks, span.start_token // self.block_size):
                if j < len(block_hashes):
                    self.cache.register(block, block_hashes[j])

    def release(self, spans: list[RemoteSpan]) -> None:
        """A sequence is done with these (finished, aborted or preempted)."""
        self._give_back(self.cache.free(blocks_of(spans)))

    def forget(self, memserver_ids: set[str]) -> None:
        """Lost or leaving: their cached blocks are matched no more, the unused ones released."""
        self._give_back(self.cache.forget(memserver_ids))

    def reset(self) -> int:
        """Release every cached block nobody uses; returns how many."""
        return self.give_up(self.cache.num_evictable)

    def _give_back(self, blocks: list[RemoteBlock]) -> None:
        self.released.extend(spans_of(blocks, 0, self.block_size))
