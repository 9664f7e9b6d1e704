"""A memory server's block pool: preallocated KV blocks, each owned by one worker, and partial
attention over an owner's blocks. No I/O here (services/memserver/server.py does that)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from kernels import paged_attention_partial, plan_paged_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PoolError(Exception):
    code = "pool_error"


class PoolFull(PoolError):
    code = "pool_full"


class OwnerCapExceeded(PoolError):
    code = "owner_cap_exceeded"


class NotOwner(PoolError):
    code = "not_owner"


@dataclass(frozen=True, slots=True)
class Geometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        if d["dtype"] not in DTYPES:
            raise ValueError(f"unsupported KV dtype {d['dtype']!r}")
        return cls(int(d["num_layers"]), int(d["num_kv_heads"]), int(d["head_dim"]), int(d["block_size"]), d["dtype"])

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.tensor([], dtype=DTYPES[self.dtype]).element_size()


class BlockPool:
    def __init__(self, geometry: Geometry, num_blocks: int, device: str = "cpu", per_owner_cap: int | None = None):
        if num_blocks < 1:
            raise ValueError(f"a pool needs at least one block; {num_blocks} fit the capacity")
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.per_owner_cap = per_owner_cap
        # Block-major, so one block (all layers) is one contiguous slot a transfer lands in.
        self.kv = torch.zeros(num_blocks, *geometry.block_shape, dtype=DTYPES[geometry.dtype], device=device)
        self._free = list(range(num_blocks))  # a heap: lowest ids first keeps allocations compact
        self._owner: list[str | None] = [None] * num_blocks
        self._held: dict[str, set[int]] = {}
        # Every layer of a worker's step sends the same tables: what was checked and prepared for
        # them is kept per owner until the tables or any block's ownership change.
        self._generation = 0
        self._prepared: dict[str, tuple[int, tuple, _Prepared]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def holdings(self) -> dict[str, int]:
        return {owner: len(ids) for owner, ids in self._held.items() if ids}

    def allocate(self, owner: str, num_blocks: int) -> list[int]:
        if num_blocks < 1:
            raise PoolError(f"num_blocks must be >= 1, got {num_blocks}")
        if num_blocks > len(self._free):
            raise PoolFull(f"{num_blocks} blocks asked, {len(self._free)} free")
        held = self._held.setdefault(owner, set())
        if self.per_owner_cap is not None and len(held) + num_blocks > self.per_owner_cap:
            raise OwnerCapExceeded(f"owner {owner} would hold {len(held) + num_blocks} blocks; the cap is {self.per_owner_cap}")
        self._generation += 1
        ids = [heapq.heappop(self._free) for _ in range(num_blocks)]
        for block_id in ids:
            self._owner[block_id] = owner
        held.update(ids)
        return ids

    def check_owned(self, owner: str, block_ids) -> None:
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks or self._owner[block_id] != owner:
                raise NotOwner(f"block {block_id} is not held by {owner}")

    def free(self, owner: str, block_ids) -> int:
        self.check_owned(owner, block_ids)
        self._generation += 1
        for block_id in set(block_ids):
            self._owner[block_id] = None
            self._held[owner].discard(block_id)
            heapq.heappush(self._free, block_id)
        return len(set(block_ids))

    def free_owner(self, owner: str) -> int:
        ids = self._held.pop(owner, set())
        self._generation += 1
        self._prepared.pop(owner, None)
        for block_id in ids:
            self._owner[block_id] = None
            heapq.heappush(self._free, block_id)
        return len(ids)

    def slot(self, block_id: int) -> torch.Tensor:
        return self.kv[block_id]  # [L, 2, bs, Hkv, D], contiguous

    def attention(self, owner: str, layer: int, q: torch.Tensor, block_tables: list[list[int]],
                  context_lens: list[int], query_lens: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal partial attention of q over the owner's blocks: every token here is older
        than every query. Returns (out [T, H, D], lse [T, H] fp32)."""
        if not 0 <= layer < self.geometry.num_layers:
            raise PoolError(f"layer {layer} out of range [0, {self.geometry.num_layers})")
        if sum(query_lens) != q.shape[0]:
            raise PoolError(f"query_lens sum to {sum(query_lens)}, q has {q.shape[0]} rows")
        p = self._prepare(owner, block_tables, context_lens, query_lens)
        k_cache, v_cache = self.kv[:, layer, 0], self.kv[:, layer, 1]
        return paged_attention_partial(q, k_cache, v_cache, p.tables, p.context_lens, p.query_starts, scale,
                                       causal=False, plan=p.plan)

    def _prepare(self, owner: str, block_tables, context_lens, query_lens) -> "_Prepared":
        key = (tuple(map(tuple, block_tables)), tuple(context_lens), tuple(query_lens))
        hit = self._prepared.get(owner)
        if hit is not None and hit[0] == self._generation and hit[1] == key:
            return hit[2]
        if len(block_tables) != len(context_lens) or len(block_tables) != len(query_lens):
            raise PoolError("block_tables, context_lens and query_lens differ in length")
        bs = self.geometry.block_size
        for table, n in zip(block_tables, context_lens):
            self.check_owned(owner, table)
            if n > len(table) * bs:
                raise PoolError(f"context_len {n} exceeds the {len(table)} blocks given")
        width = max(1, max((len(t) for t in block_tables), default=1))
        device = self.kv.device
        tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32, device=device)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        query_starts = torch.tensor(starts, dtype=torch.int32, device=device)
        plan = plan_paged_attention(tables, lens, query_starts, self.kv[:, 0, 0], self.kv.dtype, causal=False)
        prepared = _Prepared(tables, lens, query_starts, plan)
        self._prepared[owner] = (self._generation, key, prepared)
        return prepared


@dataclass(frozen=True, slots=True)
class _Prepared:
    tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32
    query_starts: torch.Tensor  # [S + 1] int32
    plan: object  # kernels.plan_paged_attention's, None on CUDA
