"""Triton merge of partial attention states (out_i, lse_i), in a fixed order (deterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.validate import check_merge_inputs


@triton.jit
def _merge_states_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    lse_out_ptr,  # [num_tokens, num_heads] fp32
    outs_ptr,  # [num_states, num_tokens, num_heads, head_dim]
    lses_ptr,  # [num_states, num_tokens, num_heads] fp32
    num_states,
    num_rows,  # num_tokens * num_heads
    stride_sn: tl.int64, stride_st: tl.int64, stride_sh: tl.int64,
    stride_ln: tl.int64, stride_lt: tl.int64, stride_lh: tl.int64,
    stride_ot: tl.int64, stride_oh: tl.int64,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    token = rows // NUM_HEADS
    head = rows % NUM_HEADS
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    lse_offs = token * stride_lt + head * stride_lh
    state_offs = token[:, None] * stride_st + head[:, None] * stride_sh + dims[None, :]

    lse_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for i in range(num_states):
        lse_i = tl.load(lses_ptr + i * stride_ln + lse_offs, mask=row_valid, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse_i)
    safe_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PAD], dtype=tl.float32)
    for i in range(num_states):
        lse_i = tl.load(lses_ptr + i * stride_ln + lse_offs, mask=row_valid, other=float("-inf"))
        w = tl.exp(lse_i - safe_max)  # 0 for empty partitions
        out_i = tl.load(outs_ptr + i * stride_sn + state_offs, mask=mask, other=0.0).to(tl.float32)
        # An empty partition's out is ignored even if it holds garbage (0 * NaN would be NaN).
        acc += tl.where((w > 0.0)[:, None], w[:, None] * out_i, 0.0)
        total += w

    nonempty = total > 0.0
    denom = tl.where(nonempty, total, 1.0)
    out = acc / denom[:, None]
    lse = tl.where(nonempty, safe_max + tl.log(denom), float("-inf"))
    o_offs = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_out_ptr + rows, lse, mask=row_valid)  # lse_out is contiguous [T, H]


def merge_stacked_triton(
    outs: torch.Tensor, lses: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge stacked states: outs [N, T, H, D] (head_dim contiguous), lses [N, T, H] fp32.

    lse = logsumexp_i(lse_i); out = sum_i exp(lse_i - lse) * out_i, accumulated in fp32 over
    i = 0..N-1 in order and cast once to out_dtype (default outs.dtype). All -inf -> (0, -inf).
    """
    if outs.dim() != 4 or lses.dim() != 3 or outs.shape[:3] != lses.shape:
        raise ValueError(f"outs must be [N, T, H, D] and lses [N, T, H], got {tuple(outs.shape)}, "
                         f"{tuple(lses.shape)}")
    if lses.dtype != torch.float32:
        raise ValueError(f"lses.dtype must be torch.float32, got {lses.dtype}")
    if outs.shape[-1] > 1 and outs.stride(-1) != 1:
        raise ValueError(f"outs must be contiguous in head_dim, got strides {outs.stride()}")
    num_states, num_tokens, num_heads, head_dim = outs.shape
    out = torch.empty(outs.shape[1:], dtype=out_dtype or outs.dtype, device=outs.device)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=outs.device)
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return out, lse
    head_dim_pad = triton.next_power_of_2(head_dim)
    block_r = max(1, min(64, 4096 // head_dim_pad))
    grid = (triton.cdiv(num_rows, block_r),)
    _merge_states_kernel[grid](
        out, lse, outs, lses, num_states, num_rows,
        outs.stride(0), outs.stride(1), outs.stride(2),
        lses.stride(0), lses.stride(1), lses.stride(2),
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_R=block_r,
    )
    return out, lse


def merge_states_triton(
    states: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial states in list order; see merge_stacked_triton for the formula.

    states: [(out_i [T, H, D], lse_i [T, H] fp32)], one dtype; returns (out in that dtype, lse fp32).
    """
    check_merge_inputs(states)
    outs = torch.stack([out for out, _ in states])
    lses = torch.stack([lse for _, lse in states])
    return merge_stacked_triton(outs, lses)
