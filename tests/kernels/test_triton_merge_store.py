"""Triton merge_states and store_kv vs the torch reference: interpreter on CPU, natively on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.reference import merge_states_ref, store_kv_ref

triton_merge = pytest.importorskip("kernels.triton_merge")
triton_store = pytest.importorskip("kernels.triton_store")
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]  # vLLM's --kv-cache-dtype fp8 / fp8_e5m2

NEG_INF = float("-inf")


def _states(num_states, num_tokens, num_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    states = []
    for i in range(num_states):
        out = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
        lse = torch.randn(num_tokens, num_heads, generator=gen) * 4
        if i == 1:  # an empty partition with garbage out
            lse[:] = NEG_INF
            out[:] = float("nan")
        lse[0, 0] = NEG_INF  # a position empty in every partition
        states.append((out.to(device), lse.to(device)))
    return states


def _check_merge(num_states, shape, dtype, device):
    states = _states(num_states, *shape, dtype, device)
    out, lse = triton_merge.merge_states_triton(states)
    ref_out, ref_lse = merge_states_ref([(o.cpu(), l.cpu()) for o, l in states])
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-5)
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=1e-2)


MERGE_GRID = [(2, (3, 4, 64), torch.float32), (5, (2, 8, 80), torch.float16), (3, (1, 2, 32), torch.float32)]


@pytest.mark.parametrize("num_states,shape,dtype", MERGE_GRID)
def test_merge_matches_reference_interpreted(num_states, shape, dtype):
    _check_merge(num_states, shape, dtype, "cpu")


def test_merge_is_deterministic_and_single_state_is_identity():
    states = _states(4, 3, 4, 64, torch.float32, "cpu")
    a = triton_merge.merge_states_triton(states)
    b = triton_merge.merge_states_triton(states)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    out, lse = triton_merge.merge_states_triton([states[0]])
    torch.testing.assert_close(out, states[0][0].masked_fill(states[0][1].isneginf().unsqueeze(-1), 0))


def _check_store(dtype, device, num_blocks=6, block_size=16, num_kv_heads=2, head_dim=64, kv_dtype=None):
    # kv_dtype: the cache's, when it differs from the new rows' (an fp8 cache)
    gen = torch.Generator().manual_seed(0)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cache_dtype = kv_dtype or dtype
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:7].to(torch.int32)
    # key / value as strided views of a fused qkv projection, like the model produces.
    kv = torch.randn(7, 2, num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, want_k, want_v, slots)
    k_dev, v_dev = k_cache.to(device), v_cache.to(device)
    triton_store.store_kv_triton(key.to(device), value.to(device), k_dev, v_dev, slots.to(device))
    for got, want in ((k_dev, want_k), (v_dev, want_v)):  # bit for bit (fp8 compared as bytes)
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_matches_reference_interpreted(dtype):
    _check_store(dtype, "cpu")
    _check_store(dtype, "cpu", block_size=32, num_kv_heads=1, head_dim=80)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_rounds_into_an_fp8_cache_as_the_reference_interpreted(dtype, kv_dtype):
    _check_store(dtype, "cpu", kv_dtype=kv_dtype)


def test_store_into_slots_beyond_int32_offsets():
    # slot * row stride > 2^31 elements: a real (lazily mapped) 4 GiB fp16 pool.
    block_size, num_kv_heads, head_dim = 16, 1, 32
    num_blocks = 2**31 // (block_size * num_kv_heads * head_dim) + 8
    try:
        pool = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float16)
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(f"cannot map a 4 GiB pool: {e}")
    slots = torch.tensor([num_blocks * block_size - 1, 3, (num_blocks - 5) * block_size + 7])
    key = torch.randn(3, num_kv_heads, head_dim).half()
    value = torch.randn(3, num_kv_heads, head_dim).half()
    # K and V share the pool: the value rows land last, as in the reference.
    triton_store.store_kv_triton(key, value, pool, pool, slots)
    flat = pool.view(-1, num_kv_heads, head_dim)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(flat[slot], value[t])


def _require_native_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("TRITON_INTERPRET is on: run with TRITON_INTERPRET=0 (kernels/gpu_check.sh)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_and_store_on_cuda(dtype):
    _require_native_cuda()
    for num_states, shape, _ in MERGE_GRID + [(8, (64, 32, 128), None)]:
        _check_merge(num_states, shape, dtype, "cuda")
    _check_store(dtype, "cuda")
    _check_store(dtype, "cuda", block_size=32, num_kv_heads=8, head_dim=128)
    for kv_dtype in FP8:
        _check_store(dtype, "cuda", kv_dtype=kv_dtype)
