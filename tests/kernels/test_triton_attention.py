"""Triton paged partial attention vs the torch reference: interpreter on CPU, natively on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.reference import paged_attention_partial_ref
from tests.kernels.cases import Case, assert_states_close, make_inputs

triton_attention = pytest.importorskip("kernels.triton_attention")

F16, F32 = torch.float16, torch.float32
# Decode and prefill (q_len, kv_len) mixes; GQA 1/4/8; empty and single-token partitions.
CASES = [
    Case(q_lens=(1, 1, 1, 1), kv_lens=(37, 1, 0, 64), dtype=F16),  # decode, GQA 4
    Case(q_lens=(1, 1, 1), kv_lens=(70, 16, 5), num_heads=8, num_kv_heads=1, head_dim=32),  # MQA 8
    Case(q_lens=(1, 1), kv_lens=(45, 0), num_heads=2, num_kv_heads=2, head_dim=128, block_size=32, dtype=F16),
    Case(q_lens=(7, 3), kv_lens=(7, 40), num_heads=4, num_kv_heads=4, block_size=32),  # prefill chunks
    Case(q_lens=(1, 5, 0, 3), kv_lens=(33, 5, 10, 0), head_dim=80, dtype=F16),  # mixed, d 80
    Case(q_lens=(20,), kv_lens=(52,), num_heads=8, num_kv_heads=1, head_dim=96, block_size=8),  # > 1 q tile
    Case(q_lens=(3,), kv_lens=(1,), num_heads=4, num_kv_heads=1, head_dim=32, block_size=128),  # q_len > kv
    Case(q_lens=(2, 1), kv_lens=(30, 1), num_heads=8, num_kv_heads=2, head_dim=64, shuffle=False),
    # fp8 KV caches (vLLM's --kv-cache-dtype fp8 / fp8_e5m2), read in q's dtype (bf16 q: on CUDA only,
    # as every bf16 case: the interpreter's bf16 is not IEEE bf16)
    Case(q_lens=(1, 1, 1), kv_lens=(37, 0, 64), kv_dtype=torch.float8_e4m3fn),
    Case(q_lens=(5, 1), kv_lens=(40, 17), head_dim=80, kv_dtype=torch.float8_e5m2),
    Case(q_lens=(3, 1), kv_lens=(3, 50), num_heads=8, num_kv_heads=1, dtype=F16, kv_dtype=torch.float8_e4m3fn),
]
GPU_CASES = CASES + [
    Case(q_lens=c.q_lens, kv_lens=c.kv_lens, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
         head_dim=c.head_dim, block_size=c.block_size, dtype=torch.bfloat16, kv_dtype=c.kv_dtype)
    for c in CASES
] + [Case(q_lens=(1,) * 16 + (64, 100), kv_lens=tuple(range(0, 4000, 250)) + (64, 900), dtype=F16)]


def _check(case: Case, causal: bool, device: str, **kwargs) -> None:
    inp = make_inputs(case, device=device)
    out, lse = triton_attention.paged_attention_partial_triton(*inp.args(), causal=causal, **kwargs)
    ref = make_inputs(case)  # reference on CPU, from the same seed
    ref_out, ref_lse = paged_attention_partial_ref(*ref.args(), causal=causal)
    assert_states_close(out.cpu(), lse.cpu(), ref_out, ref_lse, case.dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference_interpreted(case):
    _check(case, causal=True, device="cpu")
    _check(case, causal=False, device="cpu")


@pytest.mark.parametrize("num_kv_splits", [2, 5])
def test_kv_splits_merge_to_the_same_result(num_kv_splits):
    case = Case(q_lens=(1, 4), kv_lens=(90, 33), dtype=F16)
    _check(case, causal=True, device="cpu", num_kv_splits=num_kv_splits)


def test_block_ids_beyond_int32_offsets():
    # Block ids whose element offset (id * block stride) exceeds 2^31: a real 4 GiB fp16 pool.
    # torch.empty maps it lazily; only the blocks written below are ever touched. K and V share
    # the pool (valid attention input) to halve the address space.
    block_size, num_kv_heads, head_dim = 16, 1, 32
    block_stride = block_size * num_kv_heads * head_dim
    num_blocks = 2**31 // block_stride + 8
    try:
        pool = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=F16)
    except RuntimeError as e:  # pragma: no cover - hosts without 4 GiB of address space
        pytest.skip(f"cannot map a 4 GiB pool: {e}")
    ids = torch.tensor([[num_blocks - 1, 5, num_blocks - 4], [num_blocks - 7, num_blocks - 2, 0]],
                       dtype=torch.int32)
    assert int(ids.max()) * block_stride > 2**31
    gen = torch.Generator().manual_seed(3)
    for b in ids.flatten().tolist():
        pool[b] = torch.randn(block_size, num_kv_heads, head_dim, generator=gen).to(F16)
    q = torch.randn(3, 4, head_dim, generator=gen).to(F16)
    args = (q, pool, pool, ids, torch.tensor([40, 20], dtype=torch.int32),
            torch.tensor([0, 1, 3], dtype=torch.int32), head_dim ** -0.5)
    out, lse = triton_attention.paged_attention_partial_triton(*args)
    ref_out, ref_lse = paged_attention_partial_ref(*args)
    assert_states_close(out, lse, ref_out, ref_lse, F16)


def _require_native_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("TRITON_INTERPRET is on: run with TRITON_INTERPRET=0 (kernels/gpu_check.sh)")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_matches_reference_on_cuda(case):
    _require_native_cuda()
    for splits in (None, 1, 3):
        _check(case, causal=True, device="cuda", num_kv_splits=splits)
        _check(case, causal=False, device="cuda", num_kv_splits=splits)
