"""Attention kernels. Callers use only these dispatching functions: CUDA tensors run Triton
kernels, CPU tensors the plain-torch reference (kernels.reference)."""

from kernels.dispatch import merge_states, paged_attention_partial, plan_paged_attention, store_kv

__all__ = ["merge_states", "paged_attention_partial", "plan_paged_attention", "store_kv"]
