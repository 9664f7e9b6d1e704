"""Device dispatch: CPU -> torch reference, CUDA -> Triton (kernels.triton_*).

Triton is imported only when a CUDA tensor arrives, so CPU hosts need no triton. Inputs are
validated on both paths: metadata always; values (lengths, query offsets, block ids, slots) by
default on CPU, where they cost a few microseconds, and on CUDA only with check_values=True,
since reading them there is a device->host sync on the decode hot path.
"""

from __future__ import annotations

import torch

from kernels.cpu_attention import is_decode, paged_decode_attention_cpu
from kernels.reference import merge_states_ref, paged_attention_partial_ref, store_kv_ref
from kernels.validate import (
    check_attention_inputs,
    check_attention_values,
    check_merge_inputs,
    check_store_inputs,
    check_store_values,
)


def _values_checked(check_values: bool | None, device: torch.device) -> bool:
    return device.type != "cuda" if check_values is None else check_values


def paged_attention_partial(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
    *,
    max_query_len: int | None = None,
    check_values: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels.reference.paged_attention_partial_ref for shapes and semantics.

    max_query_len: the longest query chunk, if known (spares the Triton path a sync).
    check_values: None = on CPU, off on CUDA.
    """
    if q.device.type == "cuda":
        from kernels.triton_attention import paged_attention_partial_triton

        return paged_attention_partial_triton(
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, causal,
            max_query_len=max_query_len, check_values=_values_checked(check_values, q.device),
        )
    check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale)
    lens, starts = context_lens.tolist(), query_start_loc.tolist()
    if _values_checked(check_values, q.device):
        check_attention_values(lens, starts, block_tables, q.shape[0], k_cache.shape[0], k_cache.shape[1])
    if q.shape[0] and is_decode(q.shape[0], starts) and q.dtype in (torch.float32, torch.bfloat16):
        return paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, lens, scale)
    return paged_attention_partial_ref(
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, causal
    )


def merge_states(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels.reference.merge_states_ref."""
    if states and states[0][0].device.type == "cuda":
        from kernels.triton_merge import merge_states_triton

        return merge_states_triton(states)
    check_merge_inputs(states)
    return merge_states_ref(states)


def store_kv(key, value, k_cache, v_cache, slot_mapping, *, check_values: bool | None = None) -> None:
    """See kernels.reference.store_kv_ref. check_values: None = on CPU, off on CUDA."""
    if key.device.type == "cuda":
        from kernels.triton_store import store_kv_triton

        store_kv_triton(key, value, k_cache, v_cache, slot_mapping,
                        check_values=_values_checked(check_values, key.device))
        return
    check_store_inputs(key, value, k_cache, v_cache, slot_mapping)
    if _values_checked(check_values, key.device):
        check_store_values(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
