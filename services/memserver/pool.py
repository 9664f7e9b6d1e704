"""A memory server's block pool: preallocated KV blocks, each owned by one worker, and partial
attention over an owner's blocks. No I/O here (services/memserver/service.py does that)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import paged_attention_partial, plan_paged_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # fp8: the worker's --kv-cache-dtype
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


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
    dtype: str  # the KV's
    compute_dtype: str = ""  # the queries' and outputs' (the model's); "": the KV's

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        compute = d.get("compute_dtype") or d["dtype"]
        if d["dtype"] not in DTYPES or compute not in COMPUTE_DTYPES:
            raise ValueError(f"unsupported KV dtype {d['dtype']!r} (computed in {compute!r})")
        return cls(int(d["num_layers"]), int(d["num_kv_heads"]), int(d["head_dim"]), int(d["block_size"]), d["dtype"],
                   compute)

    @property
    def q_dtype(self) -> str:
        return self.compute_dtype or self.dtype

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One block of one layer's K (or V): a StoreBlocks frame holds num_blocks of these."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

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
        # Layer-major, as the worker's cache: [L, 2, N, block_size, Hkv, D]. Each layer's K (and V)
        # is contiguous, so attention reads a sequence's consecutive blocks in place (no gather),
        # and a StoreBlocks frame (one layer's K or V of consecutive blocks) lands in it directly.
        g = geometry
        self.kv = torch.zeros(g.num_layers, 2, num_blocks, *g.frame_shape, dtype=DTYPES[g.dtype], device=device)
        # (K, V) views of each layer, made once: indexing self.kv costs microseconds every call
        self._layer_kv = [(self.kv[layer, 0], self.kv[layer, 1]) for layer in range(g.num_layers)]
        self._free_map = bytearray(b"\x01") * num_blocks  # 1: free
        self._num_free = num_blocks
        self._owner: list[str | None] = [None] * num_blocks
        self._held: dict[str, set[int]] = {}
        # Every layer of a worker's step sends the same tables: what was checked and prepared for
        # them is kept per owner until the tables or any block's ownership change.
        self._generation = 0
        self._prepared: dict[str, tuple[int, tuple, _Prepared]] = {}

    @property
    def num_free(self) -> int:
        return self._num_free

    def holdings(self) -> dict[str, int]:
        return {owner: len(ids) for owner, ids in self._held.items() if ids}

    def allocate(self, owner: str, num_blocks: int) -> list[int]:
        """The lowest run of ``num_blocks`` consecutive free ids (a transfer lands in place and
        attention reads it without a gather); the lowest free ids when the pool has no such run."""
        if num_blocks < 1:
            raise PoolError(f"num_blocks must be >= 1, got {num_blocks}")
        if num_blocks > self._num_free:
            raise PoolFull(f"{num_blocks} blocks asked, {self._num_free} free")
        held = self._held.setdefault(owner, set())
        if self.per_owner_cap is not None and len(held) + num_blocks > self.per_owner_cap:
            raise OwnerCapExceeded(f"owner {owner} would hold {len(held) + num_blocks} blocks; the cap is {self.per_owner_cap}")
        self._generation += 1
        ids = self._take(num_blocks)
        for block_id in ids:
            self._owner[block_id] = owner
        held.update(ids)
        return ids

    def _take(self, num_blocks: int) -> list[int]:
        free_map = self._free_map
        start = free_map.find(b"\x01" * num_blocks)
        if start >= 0:
            ids = list(range(start, start + num_blocks))
        else:
            ids, pos = [], 0
            while len(ids) < num_blocks:
                pos = free_map.find(1, pos)
                ids.append(pos)
                pos += 1
        for block_id in ids:
            free_map[block_id] = 0
        self._num_free -= num_blocks
        return ids

    def check_owned(self, owner: str, block_ids) -> None:
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks or self._owner[block_id] != owner:
                raise NotOwner(f"block {block_id} is not held by {owner}")

    def free(self, owner: str, block_ids) -> int:
        self.check_owned(owner, block_ids)
        self._generation += 1
        unique = set(block_ids)
        for block_id in unique:
            self._owner[block_id] = None
            self._held[owner].discard(block_id)
        self._release(unique)
        return len(unique)

    def free_owner(self, owner: str) -> int:
        ids = self._held.pop(owner, set())
        self._generation += 1
        self._prepared.pop(owner, None)
        for block_id in ids:
            self._owner[block_id] = None
        self._release(ids)
        return len(ids)

    def _release(self, block_ids) -> None:
        for block_id in block_ids:
            self._free_map[block_id] = 1
        self._num_free += len(block_ids)

    def receive_buffers(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Where a StoreBlocks' frames land, frame 2 * layer + (0 for K, 1 for V), each
        [n, block_size, Hkv, D]: views of the pool when the ids are consecutive (zero-copy), else
        staging buffers that ``place`` copies in."""
        n, g = len(block_ids), self.geometry
        if _consecutive(block_ids):
            return [self.kv[layer, kv].narrow(0, block_ids[0], n) for layer in range(g.num_layers) for kv in (0, 1)]
        return [self.kv.new_empty((n, *g.frame_shape)) for _ in range(2 * g.num_layers)]

    def place(self, block_ids: list[int], buffers: list[torch.Tensor]) -> None:
        """Finish a store into ``receive_buffers(block_ids)``: copy staged frames into their blocks."""
        if _consecutive(block_ids):
            return
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.kv.device)
        for i, buffer in enumerate(buffers):
            dst = self.kv[i // 2, i % 2]
            if dst.element_size() == 1:  # fp8 KV: index_copy_ has no fp8 kernel; the bytes are the values
                dst, buffer = dst.view(torch.uint8), buffer.view(torch.uint8)
            dst.index_copy_(0, ids, buffer)

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
        k_cache, v_cache = self._layer_kv[layer]  # [N, bs, Hkv, D] each, contiguous
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
        plan = plan_paged_attention(tables, lens, query_starts, self.kv[0, 0], DTYPES[self.geometry.q_dtype],
                                    causal=False)
        prepared = _Prepared(tables, lens, query_starts, starts[-1], plan)
        self._prepared[owner] = (self._generation, key, prepared)
        return prepared


def _consecutive(block_ids: list[int]) -> bool:
    return block_ids == list(range(block_ids[0], block_ids[0] + len(block_ids)))


@dataclass(frozen=True, slots=True)
class _Prepared:
    tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32
    query_starts: torch.Tensor  # [S + 1] int32
    num_tokens: int  # query rows: sum of query_lens
    plan: object  # kernels.plan_paged_attention's, None on CUDA
