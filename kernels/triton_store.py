"""Triton KV store: write each new token's K/V rows into its slot of the paged cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.validate import check_store_inputs, check_store_values


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping_ptr,  # [num_tokens]
    stride_kt: tl.int64, stride_kh: tl.int64,
    stride_vt: tl.int64, stride_vh: tl.int64,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    # slot = block_id * block_size + offset; a slot's row starts at slot * (kv_heads * head_dim).
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    cache_offs = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_offs, k, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(v_cache_ptr + cache_offs, v, mask=mask)


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    check_values: bool = True,
) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = key[t], likewise value; in place.

    key/value [num_tokens, num_kv_heads, head_dim] in the cache dtype, or a float dtype for an fp8
    cache (rounded to it by torch first, as the reference; head_dim contiguous);
    caches [num_blocks, block_size, num_kv_heads, head_dim] contiguous; slot = block_id *
    block_size + offset, in [0, num_blocks * block_size). check_values reads slot_mapping (a sync
    on CUDA) to reject out-of-range slots.
    """
    check_store_inputs(key, value, k_cache, v_cache, slot_mapping)
    if check_values:
        check_store_values(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.dtype != k_cache.dtype:  # an fp8 cache: the kernel moves bytes, torch rounds (round to nearest even)
        key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )
