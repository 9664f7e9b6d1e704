"""Paged KV block allocation with automatic prefix caching: pure Python, ref-counted.

A full block whose KV has been computed is registered under the hash of its tokens and of every
token before them (`prefix_hash.block_hashes`). When its last user frees it, it keeps its KV and
waits in an LRU of evictable blocks: a later sequence whose prompt starts with the same tokens
takes it instead of recomputing them (`match`). Evictable blocks count as free: `allocate` hands
out never-registered blocks first, then evicts the least recently freed.

A freed sequence's blocks join the LRU in token order, so its prefix is evicted first. vLLM
evicts the tail first (a half-evicted prefix is useless); here the order of freeing is kept
because it is the order blocks are handed out again, and a lone sequence whose blocks are
consecutive ids has its decode attention read them in place (kernels.cpu_attention, 6K tokens:
0.85 ms instead of 1.13 ms gathered).
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))  # hold nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; least recent first
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # registered block -> hash of its tokens and their prefix
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding registered KV, in use or evictable."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} KV blocks, {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block_id)]
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def num_users(self, block_id: int) -> int:
        """Sequences holding the block (0: free or evictable)."""
        return self._ref_counts[block_id]

    def share(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if self._ref_counts[block_id] < 1:
                raise RuntimeError(f"block {block_id} is not allocated")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count < 1:
                raise RuntimeError(f"block {block_id} freed twice")
            self._ref_counts[block_id] = count - 1
            if count > 1:
                continue
            if block_id in self._hash_of:
                self._evictable[block_id] = None
            else:
                self._free.append(block_id)

    # --- prefix caching ---
    def register(self, block_id: int, block_hash: bytes) -> None:
        """block_id (allocated, full, its KV computed) holds the tokens `block_hash` names. A hash
        already held by another block keeps that one."""
        if not self.enable_caching or block_hash in self._block_of or block_id in self._hash_of:
            return
        if self._ref_counts[block_id] < 1:
            raise RuntimeError(f"block {block_id} is not allocated")
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id

    def num_cached(self, block_hashes: list[bytes]) -> int:
        """How many of the first `block_hashes` are cached here (taking nothing)."""
        num = 0
        while self.enable_caching and num < len(block_hashes) and block_hashes[num] in self._block_of:
            num += 1
        return num

    def reset_cache(self) -> int:
        """Forget the cached KV of every block nobody uses; returns how many."""
        num = len(self._evictable)
        for block_id in self._evictable:
            del self._block_of[self._hash_of.pop(block_id)]
            self._free.append(block_id)
        self._evictable.clear()
        return num

    def match(self, block_hashes: list[bytes]) -> list[int]:
        """Take the cached blocks of the longest prefix of `block_hashes` (one reference each)."""
        block_ids = []
        if not self.enable_caching:
            return block_ids
        for block_hash in block_hashes:
            block_id = self._block_of.get(block_hash)
            if block_id is None:
                break
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
            block_ids.append(block_id)
        return block_ids
