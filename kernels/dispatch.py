"""Device dispatch: CPU -> torch reference, CUDA -> Triton (kernels.triton_*)."""

from __future__ import annotations

import torch

from kernels.reference import merge_states_ref, paged_attention_partial_ref, store_kv_ref


def paged_attention_partial(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels.reference.paged_attention_partial_ref for shapes and semantics."""
    return paged_attention_partial_ref(
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, causal
    )


def merge_states(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels.reference.merge_states_ref."""
    return merge_states_ref(states)


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """See kernels.reference.store_kv_ref."""
    store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
