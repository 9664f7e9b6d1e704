"""Random paged-attention inputs shared by the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    shuffle: bool = True  # block ids in random order, not 0, 1, 2, ...
    kv_dtype: torch.dtype | None = None  # the caches' dtype when not q's (an fp8 KV cache)

    def __str__(self) -> str:
        kv = f"-kv_{str(self.kv_dtype).removeprefix('torch.')}" if self.kv_dtype is not None else ""
        return (f"q{list(self.q_lens)}-kv{list(self.kv_lens)}-h{self.num_heads}/{self.num_kv_heads}"
                f"-d{self.head_dim}-bs{self.block_size}-{str(self.dtype).removeprefix('torch.')}{kv}")


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens,
                self.query_start_loc, self.scale)


def make_inputs(case: Case, device: str = "cpu", seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    bs = case.block_size
    blocks_per_seq = [-(-n // bs) for n in case.kv_lens]
    max_blocks = max(blocks_per_seq + [1]) + 1  # one padding column
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that no sequence uses
    order = torch.randperm(num_blocks, generator=gen) if case.shuffle else torch.arange(num_blocks)
    # Padding entries hold garbage (past the pool), which must never be read.
    tables = torch.full((len(case.kv_lens), max_blocks), 10**6, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used:used + n]
        used += n
    shape = (num_blocks, bs, case.num_kv_heads, case.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(case.kv_dtype or case.dtype)
    v_cache = torch.randn(shape, generator=gen).to(case.kv_dtype or case.dtype)
    q = torch.randn(sum(case.q_lens), case.num_heads, case.head_dim, generator=gen).to(case.dtype)
    starts = [0]
    for n in case.q_lens:
        starts.append(starts[-1] + n)
    return Inputs(
        q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
        block_tables=tables.to(device),
        context_lens=torch.tensor(case.kv_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        scale=case.head_dim ** -0.5,
    )


def assert_states_close(out, lse, ref_out, ref_lse, dtype: torch.dtype) -> None:
    """Same -inf pattern, no NaN, finite values close for the dtype."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert lse.dtype == torch.float32 and out.dtype == ref_out.dtype
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2)  # bf16: 8-bit mantissa
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=1e-2)
