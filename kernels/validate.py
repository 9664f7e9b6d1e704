"""Input checks shared by the dispatchers and the Triton launchers.

Two tiers, both raising ValueError that names the value and what was expected:
  * metadata checks (shapes, dtypes, strides, devices): tensor attributes only, no data read,
    ~2-4 us; always run.
  * value checks (lengths, query offsets, block ids, slots): read tensor data. On CPU that is a
    few microseconds; on CUDA it is a device->host sync, so callers opt in there.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# vLLM's --kv-cache-dtype fp8 (scale 1): K/V stored in 8 bits, computed in q's dtype
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_BLOCK_SIZE = 128
MAX_HEAD_DIM = 256


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        _fail(f"{name}.dtype must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        _fail(f"{name} is on {t.device}, expected {device} (the device of q)")


def _check_head_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(f"{name} must be contiguous in its last (head_dim) dimension, got strides {t.stride()}")


def _fp8_cache(cache: torch.Tensor) -> bool:
    """An 8-bit cache (read in q's dtype). On CUDA, Triton converts e4m3 in hardware from compute
    capability 8.9 (Ada, Hopper) on; e5m2 everywhere."""
    if cache.dtype not in FP8_DTYPES:
        return False
    if cache.device.type == "cuda" and cache.dtype == torch.float8_e4m3fn:
        capability = torch.cuda.get_device_capability(cache.device)
        if capability < (8, 9):
            _fail(f"an fp8_e4m3 KV cache needs a GPU of compute capability >= 8.9; {cache.device} has "
                  f"{capability[0]}.{capability[1]}: use --kv-cache-dtype fp8_e5m2 (or auto)")
    return True


def check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale) -> None:
    """Metadata checks for paged_attention_partial (see kernels.reference for the layout)."""
    _check_ndim("q", q, 3, "[num_tokens, num_heads, head_dim]")
    _check_ndim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _check_ndim("v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _check_ndim("block_tables", block_tables, 2, "[num_seqs, max_blocks]")
    _check_ndim("context_lens", context_lens, 1, "[num_seqs]")
    _check_ndim("query_start_loc", query_start_loc, 1, "[num_seqs + 1]")
    _check_dtype("q", q, FLOAT_DTYPES)
    if v_cache.dtype != k_cache.dtype or (k_cache.dtype != q.dtype and not _fp8_cache(k_cache)):
        _fail(f"k_cache and v_cache must share q's dtype (or one fp8 dtype), got {q.dtype}, {k_cache.dtype}, "
              f"{v_cache.dtype}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens),
                    ("query_start_loc", query_start_loc)):
        _check_dtype(name, t, INDEX_DTYPES)
    device = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens), ("query_start_loc", query_start_loc)):
        _check_device(name, t, device)
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache.shape {tuple(v_cache.shape)} must equal k_cache.shape {tuple(k_cache.shape)}")
    if cache_head_dim != head_dim:
        _fail(f"k_cache head_dim ({cache_head_dim}) must equal q head_dim ({head_dim})")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        _fail(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        _fail(f"num_heads ({num_heads}, q.shape[1]) must be a positive multiple of "
              f"num_kv_heads ({num_kv_heads}, k_cache.shape[2])")
    if block_size <= 0 or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        _fail(f"block_size (k_cache.shape[1]) must be a power of two <= {MAX_BLOCK_SIZE}, got {block_size}")
    num_seqs = context_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        _fail(f"block_tables.shape[0] ({block_tables.shape[0]}) must equal num_seqs "
              f"({num_seqs}, len(context_lens))")
    if query_start_loc.shape[0] != num_seqs + 1:
        _fail(f"query_start_loc must have num_seqs + 1 = {num_seqs + 1} entries, "
              f"got {query_start_loc.shape[0]}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_head_dim_contiguous(name, t)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        _fail(f"scale must be a finite positive float, got {scale!r}")


def check_attention_values(
    context_lens: list[int],
    query_start_loc: list[int],
    block_tables: torch.Tensor,
    num_tokens: int,
    num_blocks: int,
    block_size: int,
) -> None:
    """Value checks, given context_lens / query_start_loc already read to host lists."""
    if query_start_loc[0] != 0 or query_start_loc[-1] != num_tokens:
        _fail(f"query_start_loc must start at 0 and end at num_tokens ({num_tokens}), "
              f"got {query_start_loc[0]} .. {query_start_loc[-1]}")
    if any(b < a for a, b in zip(query_start_loc, query_start_loc[1:])):
        _fail(f"query_start_loc must be non-decreasing, got {query_start_loc}")
    if not context_lens:
        return
    if min(context_lens) < 0:
        _fail(f"context_lens must be >= 0, got {context_lens}")
    max_len = max(context_lens)
    capacity = block_tables.shape[1] * block_size
    if max_len > capacity:
        _fail(f"context_lens max ({max_len}) exceeds the block table capacity "
              f"({block_tables.shape[1]} blocks x block_size {block_size} = {capacity})")
    used_cols = -(-max_len // block_size)
    if used_cols == 0:
        return
    used = block_tables[:, :used_cols]
    lo, hi = (int(x) for x in torch.aminmax(used))
    if (lo < 0 or hi >= num_blocks) and min(context_lens) < max_len:
        # Only the blocks a sequence uses must be valid: the tail of a short row is padding.
        lens = torch.tensor(context_lens, device=block_tables.device)
        cols = torch.arange(used_cols, device=block_tables.device)
        used = used[cols.view(1, -1) * block_size < lens.view(-1, 1)]
        lo, hi = (int(x) for x in torch.aminmax(used))
    if lo < 0 or hi >= num_blocks:
        _fail(f"block_tables entries must be in [0, num_blocks={num_blocks}) (k_cache.shape[0]), "
              f"got values in [{lo}, {hi}]")


def check_merge_inputs(states) -> None:
    """states: non-empty list of (out [num_tokens, num_heads, head_dim], lse [num_tokens, num_heads] fp32)."""
    if not isinstance(states, (list, tuple)) or not states:
        _fail("merge_states needs a non-empty list of (out, lse) states")
    out0, _ = states[0]
    _check_ndim("states[0].out", out0, 3, "[num_tokens, num_heads, head_dim]")
    _check_dtype("states[0].out", out0, FLOAT_DTYPES)
    for i, state in enumerate(states):
        if not isinstance(state, (list, tuple)) or len(state) != 2:
            _fail(f"states[{i}] must be an (out, lse) pair")
        out, lse = state
        _check_ndim(f"states[{i}].out", out, 3, "[num_tokens, num_heads, head_dim]")
        _check_ndim(f"states[{i}].lse", lse, 2, "[num_tokens, num_heads]")
        if out.shape != out0.shape:
            _fail(f"states[{i}].out.shape {tuple(out.shape)} must equal states[0].out.shape {tuple(out0.shape)}")
        if lse.shape != out.shape[:2]:
            _fail(f"states[{i}].lse.shape {tuple(lse.shape)} must equal out.shape[:2] {tuple(out.shape[:2])}")
        if out.dtype != out0.dtype:
            _fail(f"states[{i}].out.dtype {out.dtype} must equal states[0].out.dtype {out0.dtype}")
        if lse.dtype != torch.float32:
            _fail(f"states[{i}].lse.dtype must be torch.float32, got {lse.dtype}")
        _check_device(f"states[{i}].out", out, out0.device)
        _check_device(f"states[{i}].lse", lse, out0.device)


def check_store_inputs(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Metadata checks for store_kv: key/value [num_tokens, num_kv_heads, head_dim] into contiguous caches."""
    _check_ndim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    _check_ndim("value", value, 3, "[num_tokens, num_kv_heads, head_dim]")
    _check_ndim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _check_ndim("v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _check_ndim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    _check_dtype("k_cache", k_cache, FLOAT_DTYPES + (FP8_DTYPES if _fp8_cache(k_cache) else ()))
    if v_cache.dtype != k_cache.dtype:
        _fail(f"v_cache.dtype {v_cache.dtype} must equal k_cache.dtype {k_cache.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != k_cache.dtype and not (_fp8_cache(k_cache) and t.dtype in FLOAT_DTYPES):
            _fail(f"{name}.dtype {t.dtype} must equal the cache dtype {k_cache.dtype}")
    _check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    for name, t in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            _fail(f"{name} is on {t.device}, expected {key.device} (the device of key)")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache.shape {tuple(v_cache.shape)} must equal k_cache.shape {tuple(k_cache.shape)}")
    if value.shape != key.shape:
        _fail(f"value.shape {tuple(value.shape)} must equal key.shape {tuple(key.shape)}")
    if key.shape[1:] != k_cache.shape[2:]:
        _fail(f"key.shape[1:] {tuple(key.shape[1:])} must equal k_cache [num_kv_heads, head_dim] "
              f"{tuple(k_cache.shape[2:])}")
    if slot_mapping.shape[0] != key.shape[0]:
        _fail(f"slot_mapping has {slot_mapping.shape[0]} entries, expected num_tokens = {key.shape[0]}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            _fail(f"{name} must be contiguous (a paged pool), got strides {t.stride()}")
    for name, t in (("key", key), ("value", value)):
        _check_head_dim_contiguous(name, t)


def check_store_values(slot_mapping: torch.Tensor, num_slots: int) -> None:
    if slot_mapping.numel() == 0:
        return
    lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
    if lo < 0 or hi >= num_slots:
        _fail(f"slot_mapping entries must be in [0, num_blocks * block_size = {num_slots}), "
              f"got values in [{lo}, {hi}]")
