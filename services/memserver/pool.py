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

    def attention(self, owner: str, layer: int, q: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal partial attention of q over the owner's blocks: every token here is older
        than every query. block_tables [S, W] int32 (padded past each sequence's blocks), seq_lens
        [3, S] int32 (rows num_blocks, context_len, query_len): the layout of an Attend message,
        CPU tensors. Returns (out [T, H, D], lse [T, H] fp32)."""
        if not 0 <= layer < self.geometry.num_layers:
            raise PoolError(f"layer {layer} out of range [0, {self.geometry.num_layers})")
        p = self._prepare(owner, block_tables, seq_lens)
        if p.num_tokens != q.shape[0]:
            raise PoolError(f"query_lens sum to {p.num_tokens}, q has {q.shape[0]} rows")
        k_cache, v_cache = self.kv[:, layer, 0], self.kv[:, layer, 1]
        return paged_attention_partial(q, k_cache, v_cache, p.tables, p.context_lens, p.query_starts, scale,
                                       causal=False, plan=p.plan)

    def _prepare(self, owner: str, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> "_Prepared":
        # The same bytes as the last call of this owner, and no block changed hands since: reuse.
        key = (block_tables.numpy().tobytes(), seq_lens.numpy().tobytes())
        hit = self._prepared.get(owner)
        if hit is not None and hit[0] == self._generation and hit[1] == key:
            return hit[2]
        num_seqs = block_tables.shape[0] if block_tables.dim() == 2 else -1
        if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (3, num_seqs):
            raise PoolError(f"block_tables [S, W] and seq_lens [3, S] must be int32, got {block_tables.dtype} "
                            f"{tuple(block_tables.shape)} and {seq_lens.dtype} {tuple(seq_lens.shape)}")
        num_blocks, context_lens, query_lens = seq_lens.tolist()
        width, bs = block_tables.shape[1], self.geometry.block_size
        rows = block_tables.tolist()
        for table, n, ctx, qlen in zip(rows, num_blocks, context_lens, query_lens):
            if not 0 <= n <= width or not 0 <= ctx <= n * bs or qlen < 0:
                raise PoolError(f"sequence of {n} blocks (table width {width}), context_len {ctx}, query_len "
                                f"{qlen}: needs 0 <= blocks <= width, 0 <= context_len <= blocks x {bs}, "
                                "query_len >= 0")
            self.check_owned(owner, table[:n])
        device = self.kv.device
        # Padding past a sequence's blocks may hold anything: zero it so every id is a valid index.
        padded = torch.arange(width).view(1, -1) >= torch.tensor(num_blocks, dtype=torch.int64).view(-1, 1)
        tables = block_tables.masked_fill(padded, 0) if width else block_tables.new_zeros(num_seqs, 1)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        tables = tables.to(device)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        query_starts = torch.tensor(starts, dtype=torch.int32, device=device)
        plan = plan_paged_attention(tables, lens, query_starts, self.kv[:, 0, 0], self.kv.dtype, causal=False)
        prepared = _Prepared(tables, lens, query_starts, starts[-1], plan)
        self._prepared[owner] = (self._generation, key, prepared)
        return prepared


@dataclass(frozen=True, slots=True)
class _Prepared:
    tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32
    query_starts: torch.Tensor  # [S + 1] int32
    num_tokens: int  # query rows: sum of query_lens
    plan: object  # kernels.plan_paged_attention's, None on CUDA
