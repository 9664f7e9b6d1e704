"""Plain-torch reference implementations: the oracle for the Triton kernels and the CPU path.

Shapes (shared with the Triton launchers):
  q            [num_tokens, num_heads, head_dim]          queries of all sequences, packed
  k_cache      [num_blocks, block_size, num_kv_heads, head_dim]
  v_cache      [num_blocks, block_size, num_kv_heads, head_dim]
  block_tables [num_seqs, max_blocks] int32               this partition's blocks of each sequence
  context_lens [num_seqs] int32                           KV tokens of each sequence in this partition
  query_start_loc [num_seqs + 1] int32                    cumulative query counts (cu_seqlens)

Causal masking is bottom-right aligned: with `causal=True`, query j of a sequence with q_len
queries sees partition tokens k <= context_len - q_len + j (the partition ends with the chunk's own
tokens: the worker's local blocks). With `causal=False` every partition token is visible (a
partition of strictly older tokens: blocks spilled to a memory server).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
_CHUNK_BYTES = 1 << 20  # K (or V) gathered per step on the decode path


def _softmax_with_lse(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [..., n] fp32 (may hold -inf rows) -> (probs, lse); an all -inf row gives 0, -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    probs = torch.where(finite.unsqueeze(-1), probs, torch.zeros_like(probs))
    return probs, lse


def _decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale):
    # One query per sequence: gather every sequence's blocks, mask the tail. K/V are gathered in
    # chunks of block columns (~1 MiB) so the copies stay in cache; scores of all chunks are
    # softmaxed together, so the math is the one-shot formula.
    num_seqs, num_heads, head_dim = q.shape
    pool_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_len = int(context_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    # Entries past a sequence's length are padding (masked below): clamp so any value is safe.
    tables = block_tables[:, :num_blocks].long().clamp(0, pool_blocks - 1)
    row_bytes = num_seqs * block_size * num_kv_heads * head_dim * 4
    cols = max(1, _CHUNK_BYTES // row_bytes)
    chunks = [tables[:, c:c + cols].reshape(-1) for c in range(0, num_blocks, cols)]

    def gather(cache, ids):  # -> [S, Hkv, n, D] fp32
        return cache.index_select(0, ids).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2).float()

    qg = q.float().reshape(num_seqs, num_kv_heads, group, head_dim)
    # scores: [S, Hkv, G, max_kv]
    scores = torch.cat([torch.matmul(qg, gather(k_cache, ids).transpose(-1, -2)) for ids in chunks], -1)
    scores *= scale
    positions = torch.arange(scores.shape[-1], device=q.device)
    invisible = positions.view(1, -1) >= context_lens.view(-1, 1).long()  # [S, max_kv]
    scores.masked_fill_(invisible.view(num_seqs, 1, 1, -1), NEG_INF)
    probs, lse = _softmax_with_lse(scores)
    out = None
    start = 0
    for ids in chunks:
        v = gather(v_cache, ids)  # [S, Hkv, n, D]
        part = torch.matmul(probs[..., start:start + v.shape[2]], v)  # [S, Hkv, G, D]
        out = part if out is None else out.add_(part)
        start += v.shape[2]
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype), lse.view(num_seqs, num_heads)


def _one_sequence(q, k_cache, v_cache, blocks, kv_len, scale, causal):
    # q: [q_len, H, D] -> out [q_len, H, D] (q dtype), lse [q_len, H] fp32
    q_len, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_blocks = (kv_len + block_size - 1) // block_size
    ids = blocks[:num_blocks].long()
    k = k_cache[ids].flatten(0, 1)[:kv_len].float()  # [kv_len, Hkv, D]
    v = v_cache[ids].flatten(0, 1)[:kv_len].float()
    qg = q.float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv,G,q,D]
    scores = torch.matmul(qg, k.permute(1, 2, 0).unsqueeze(1)) * scale  # [Hkv, G, q, kv]
    if causal:
        last_visible = torch.arange(q_len, device=q.device) + (kv_len - q_len)
        invisible = torch.arange(kv_len, device=q.device).view(1, -1) > last_visible.view(-1, 1)
        scores = scores.masked_fill(invisible, NEG_INF)
    probs, lse = _softmax_with_lse(scores)
    out = torch.matmul(probs, v.permute(1, 0, 2).unsqueeze(1))  # [Hkv, G, q, D]
    out = out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
    return out.to(q.dtype), lse.permute(2, 0, 1).reshape(q_len, num_heads)


def paged_attention_partial_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over each sequence's paged KV in this partition.

    Returns (out [num_tokens, num_heads, head_dim] in q's dtype, lse [num_tokens, num_heads] fp32),
    with out = softmax(q k^T * scale) v and lse = logsumexp(q k^T * scale), natural log. Queries
    that see no token get out = 0, lse = -inf.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    if num_seqs == num_tokens and num_seqs > 0 and starts == list(range(num_seqs + 1)):
        # One query per sequence: the causal limit is the last token, so both modes coincide.
        if max(lens) > 0:
            return _decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.zeros_like(q)
    lse = torch.full((num_tokens, num_heads), NEG_INF, dtype=torch.float32, device=q.device)
    for i in range(num_seqs):
        start, end, kv_len = starts[i], starts[i + 1], lens[i]
        if end == start or kv_len == 0:
            continue
        o, l = _one_sequence(q[start:end], k_cache, v_cache, block_tables[i], kv_len, scale, causal)
        out[start:end] = o
        lse[start:end] = l
    return out, lse


def merge_states_ref(
    states: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial attention states, in list order.

    lse = logsumexp_i(lse_i); out = sum_i exp(lse_i - lse) * out_i, in fp32, cast once at the end.
    Identity: (0, -inf). Positions where every lse_i is -inf give (0, -inf), never NaN.
    """
    if not states:
        raise ValueError("merge_states needs at least one (out, lse) state")
    out_dtype = states[0][0].dtype
    lses = torch.stack([lse.float() for _, lse in states])  # [N, T, H]
    outs = torch.stack([out for out, _ in states]).float()  # [N, T, H, D]
    lse = torch.logsumexp(lses, dim=0)  # -inf where every partition is empty
    # Normalised weights; exp(-inf) = 0 for an empty partition, and NaN (-inf - -inf) -> 0 where all are.
    weights = torch.exp(lses - lse).nan_to_num_(0.0).unsqueeze(-1)  # [N, T, H, 1]
    # An empty partition's out is ignored even if it holds garbage (0 * NaN would be NaN).
    out = (torch.where(weights > 0, outs, 0.0) * weights).sum(dim=0)  # partitions summed in list order
    return out.to(out_dtype), lse


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = key[t] (likewise value); in place.

    key/value [num_tokens, num_kv_heads, head_dim]; slot = block_id * block_size + offset.
    """
    slots = slot_mapping.long()
    for cache, new in ((k_cache, key), (v_cache, value)):
        dst, src = cache.view(-1, *cache.shape[2:]), new.to(cache.dtype)
        if cache.element_size() == 1:  # fp8: index_copy_ has no fp8 kernel; the bytes are the values
            dst, src = dst.view(torch.uint8), src.view(torch.uint8)
        dst.index_copy_(0, slots, src)
