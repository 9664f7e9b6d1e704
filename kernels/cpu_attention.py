"""Fast CPU path for decode (one query per sequence): gather each sequence's blocks once and run
PyTorch's fused CPU flash-attention kernel, which also returns the log-sum-exp. The plain-torch
reference (kernels.reference) stays the oracle; tests/kernels/test_cpu_attention.py compares them.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def is_decode(num_tokens: int, query_starts: list[int]) -> bool:
    return num_tokens == len(query_starts) - 1 and query_starts == list(range(num_tokens + 1))


def paged_decode_attention_cpu(
    q: torch.Tensor,  # [S, H, D]: one query per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    context_lens: list[int],  # [S]
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = softmax(q k^T * scale) v over each sequence's first context_lens[s] tokens, and its
    lse (fp32, natural log); a sequence with no token gets (0, -inf)."""
    num_seqs, num_heads, head_dim = q.shape
    pool_blocks, block_size, num_kv_heads, _ = k_cache.shape
    max_len = max(context_lens)
    if max_len == 0:  # the fused kernel divides by the key length: nothing to attend to anyway
        return torch.zeros_like(q), torch.full((num_seqs, num_heads), NEG_INF, dtype=torch.float32)
    num_blocks = (max_len + block_size - 1) // block_size
    width = num_blocks * block_size
    # Padding entries past a sequence's length are masked: clamp so any value is a safe index.
    ids = block_tables[:, :num_blocks].long().clamp(0, pool_blocks - 1).reshape(-1)
    # k, v: [S, Hkv, width, D] (strided views of the gathered blocks)
    k = k_cache.index_select(0, ids).view(num_seqs, width, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, ids).view(num_seqs, width, num_kv_heads, head_dim).transpose(1, 2)
    lens = torch.tensor(context_lens, dtype=torch.int64)
    mask = None
    if min(context_lens) < width:
        visible = torch.arange(width).view(1, -1) < lens.view(-1, 1)  # [S, width]
        mask = torch.zeros(num_seqs, 1, 1, width, dtype=q.dtype).masked_fill_(~visible.view(num_seqs, 1, 1, -1), NEG_INF)
    # The query heads sharing a KV head ride as that head's query rows: no K/V expansion for GQA.
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg, k, v, 0.0, False, attn_mask=mask, scale=scale
    )[:2]
    out = out.reshape(num_seqs, num_heads, head_dim)
    lse = lse.reshape(num_seqs, num_heads).float()
    if min(context_lens) == 0:
        empty = (lens == 0).view(-1, 1)
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(empty, NEG_INF)
    return out, lse
