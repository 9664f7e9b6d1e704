"""Device dispatch: CPU -> torch reference, CUDA -> Triton (kernels.triton_*).

Triton is imported only when a CUDA tensor arrives, so CPU hosts need no triton. Inputs are
validated on both paths: metadata always; values (lengths, query offsets, block ids, slots) by
default on CPU, where they cost a few microseconds, and on CUDA only with check_values=True,
since reading them there is a device->host sync on the decode hot path.
"""

from __future__ import annotations

import torch

from kernels.cpu_attention import CpuAttentionPlan, block_bytes, paged_attention_cpu, plan_cpu_attention
from kernels.cpu_merge import merge_states_cpu
from kernels.reference import paged_attention_partial_ref, store_kv_ref
from kernels.validate import (
    check_attention_inputs,
    check_attention_values,
    check_merge_inputs,
    check_store_inputs,
    check_store_values,
)


def _values_checked(check_values: bool | None, device: torch.device) -> bool:
    return device.type != "cuda" if check_values is None else check_values


def plan_paged_attention(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_cache: torch.Tensor,
    dtype: torch.dtype,
    causal: bool = True,
) -> CpuAttentionPlan | None:
    """What every layer of one forward pass shares, checked and prepared once (CPU only; None on
    CUDA, where the kernels need no preparation). Pass it to `paged_attention_partial(plan=...)`
    with any layer's cache of the same pool shape."""
    if k_cache.device.type == "cuda":
        return None
    return _plan_cpu(block_tables, context_lens, query_start_loc, k_cache, dtype, causal, None, check=True)


def _plan_cpu(block_tables, context_lens, query_start_loc, k_cache, dtype, causal, num_tokens: int | None,
              check: bool) -> CpuAttentionPlan:
    """Host copies of the lengths, their value checks (num_tokens: q's rows, else the last query
    offset), and the CPU plan."""
    lens, starts = context_lens.tolist(), query_start_loc.tolist()
    if check:
        num_tokens = num_tokens if num_tokens is not None else (starts[-1] if starts else 0)
        check_attention_values(lens, starts, block_tables, num_tokens, k_cache.shape[0], k_cache.shape[1])
    return plan_cpu_attention(block_tables, lens, starts, k_cache.shape[0], k_cache.shape[1], dtype, causal,
                              block_bytes(k_cache))


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
    plan: CpuAttentionPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels.reference.paged_attention_partial_ref for shapes and semantics.

    max_query_len: the longest query chunk, if known (spares the Triton path a sync).
    check_values: None = on CPU, off on CUDA.
    plan: from `plan_paged_attention` over the same tables, lengths and causality (CPU): its
    values were checked when it was made.
    """
    if q.is_cuda:
        from kernels.triton_attention import paged_attention_partial_triton

        return paged_attention_partial_triton(
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, causal,
            max_query_len=max_query_len, check_values=_values_checked(check_values, q.device),
        )
    check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale)
    if plan is None:
        plan = _plan_cpu(block_tables, context_lens, query_start_loc, k_cache, q.dtype, causal, q.shape[0],
                         check=_values_checked(check_values, q.device))
    elif plan.query_starts[-1] != q.shape[0]:
        raise ValueError(f"the plan covers {plan.query_starts[-1]} query tokens, q has {q.shape[0]}")
    fast = paged_attention_cpu(q, k_cache, v_cache, plan, scale)
    if fast is not None:
        return fast
    return paged_attention_partial_ref(
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, causal
    )


def merge_states(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels.reference.merge_states_ref (CPU: kernels.cpu_merge, the same in fewer ops)."""
    if states and states[0][0].device.type == "cuda":
        from kernels.triton_merge import merge_states_triton

        return merge_states_triton(states)
    check_merge_inputs(states)
    return merge_states_cpu(states)


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
