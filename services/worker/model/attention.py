"""Attention metadata passed explicitly through the model's forward, and the paged attention op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels import merge_states, paged_attention_partial, store_kv
from kernels.cpu_attention import CpuAttentionPlan


class RemoteAttention(Protocol):
    """Partial attention over blocks that live elsewhere (memory servers).

    `submit` sends this layer's queries and returns at once; `collect` returns the partial states
    in a fixed order, each (out [T, H, D], lse [T, H]) over the same packed tokens."""

    def submit(self, layer_idx: int, q: torch.Tensor) -> object: ...

    def collect(self, handle: object) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes in the local pool
    block_tables: torch.Tensor  # [S, max_blocks] int32: local blocks of each sequence
    context_lens: torch.Tensor  # [S] int32: local KV tokens of each sequence, new ones included
    query_start_loc: torch.Tensor  # [S + 1] int32
    remote: RemoteAttention | None = None
    plan: CpuAttentionPlan | None = None  # kernels.plan_paged_attention: shared by every layer
    # True when the caller checked slot_mapping's range once for the pass: the layers' stores skip it
    slots_checked: bool = False


def paged_attention(
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D] -> attention output [T, H, D] over the whole sequence."""
    # Memory servers hold only older tokens: their queries leave before the local store.
    handle = meta.remote.submit(layer_idx, q) if meta.remote is not None else None
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping, check_values=False if meta.slots_checked else None)
    out, lse = paged_attention_partial(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc, scale, causal=True,
        plan=meta.plan,
    )
    if handle is None:
        return out
    # Remote partitions hold strictly older tokens; merge order is fixed: remote (in the order
    # `collect` returns), then local, so greedy output never depends on network timing.
    remote_states = meta.remote.collect(handle)
    merged, _ = merge_states([*remote_states, (out, lse)])
    return merged
