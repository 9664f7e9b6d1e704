"""Triton paged partial attention: packed queries (decode and prefill chunks) over paged KV.

Each program owns one (sequence, kv head, query tile, kv split): its rows are BLOCK_Q query tokens
x GROUP_PAD query heads of that kv head, so GQA/MQA shares each K/V tile across the group and a
decode step still gives tl.dot at least 16 rows. KV is walked in TILE_N-token tiles (>= 16, may
span several paged blocks) with an online softmax in fp32 (exp2 domain).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.validate import check_attention_inputs, check_attention_values

LOG2E = 1.4426950408889634
MIN_DOT = 16  # tl.dot needs >= 16 in every dimension on GPUs


@triton.jit
def _paged_attention_partial_kernel(
    out_ptr,  # [num_splits, num_tokens, num_heads, head_dim]
    lse_ptr,  # [num_splits, num_tokens, num_heads] fp32, natural log
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks]
    context_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    scale_log2,  # softmax scale * log2(e)
    num_splits,
    kv_split_size,  # tokens per split, a multiple of TILE_N
    stride_os: tl.int64, stride_ot: tl.int64, stride_oh: tl.int64,
    stride_ls: tl.int64, stride_lt: tl.int64,
    stride_qt: tl.int64, stride_qh: tl.int64,
    stride_kb: tl.int64, stride_ks: tl.int64, stride_kh: tl.int64,
    stride_vb: tl.int64, stride_vs: tl.int64, stride_vh: tl.int64,
    stride_bt: tl.int64, stride_bb: tl.int64,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    q_tile = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - q_start
    kv_len = tl.load(context_lens_ptr + seq).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    q_pos = q_tile * BLOCK_Q + rows // GROUP_PAD  # position inside this sequence's chunk
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (q_pos < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM

    # Bottom-right causal alignment: query q_pos sees kv tokens < kv_len - q_len + q_pos + 1.
    if CAUSAL:
        row_limit = kv_len - q_len + q_pos + 1
        tile_limit = kv_len - q_len + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len)
    else:
        row_limit = tl.zeros([BLOCK_M], dtype=tl.int64) + kv_len
        tile_limit = kv_len
    kv_begin = split.to(tl.int64) * kv_split_size
    kv_end = tl.minimum(tile_limit, kv_begin + kv_split_size)

    q_offs = (q_start + q_pos)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table_row = block_tables_ptr + seq * stride_bt
    for start in range(kv_begin, kv_end, TILE_N):
        toks = start + tl.arange(0, TILE_N)
        tok_valid = toks < kv_end
        block_ids = tl.load(table_row + (toks // BLOCK_SIZE) * stride_bb, mask=tok_valid, other=0).to(tl.int64)
        slots = toks % BLOCK_SIZE
        kv_mask = tok_valid[:, None] & dim_valid[None, :]
        k_offs = block_ids[:, None] * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
        # [TILE_N, HEAD_DIM_PAD]; an fp8 cache is read in q's dtype (exact: fp8 values are a subset)
        k = tl.load(k_cache_ptr + k_offs, mask=kv_mask, other=0.0).to(q_ptr.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, TILE_N]
        visible = (toks[None, :] < row_limit[:, None]) & tok_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_offs = block_ids[:, None] * stride_vb + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :]
        v = tl.load(v_cache_ptr + v_offs, mask=kv_mask, other=0.0).to(q_ptr.dtype.element_ty)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    token = q_start + q_pos
    o_offs = split * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + split * stride_ls + token * stride_lt + head, lse, mask=row_valid)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_kv_splits(device: torch.device, num_programs: int, max_kv_len: int, tile_n: int) -> int:
    # Split long KV only when the (seq, kv head, q tile) grid cannot fill the GPU.
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * num_sms // max(num_programs, 1))
    return max(1, min(want, max_kv_len // (8 * tile_n), 64))


def paged_attention_partial_triton(
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
    num_kv_splits: int | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = softmax(q k^T * scale + mask) v, lse = logsumexp(q k^T * scale + mask) (natural log).

    Shapes as kernels.reference.paged_attention_partial_ref; same semantics (bottom-right causal
    mask within each sequence's partition, every token visible with causal=False, out = 0 and
    lse = -inf for queries that see nothing). fp32 accumulation; out in q's dtype, lse fp32.
    k_cache/v_cache may hold fp8 (vLLM's --kv-cache-dtype fp8, scale 1): read in q's dtype.
    max_query_len: longest chunk, if the caller knows it (else read from query_start_loc: a sync).
    num_kv_splits: split each sequence's KV across programs and merge (None: fill the GPU).
    check_values: read lengths and block ids to validate them (a device->host sync on CUDA).
    """
    check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale)
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if check_values:
        check_attention_values(context_lens.tolist(), query_start_loc.tolist(), block_tables,
                               num_tokens, num_blocks, block_size)
    num_seqs = context_lens.shape[0]
    out = torch.zeros_like(q)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    if num_seqs == 0 or num_tokens == 0:
        return out, lse
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len <= 0:
        return out, lse

    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    # Rows = query tokens x padded group; at least 16 rows, at most 64 (registers).
    block_q = min(_next_pow2(max_query_len), max(1, 64 // group_pad))
    block_q = max(block_q, max(1, MIN_DOT // group_pad))
    tile_n = max(MIN_DOT, min(block_size, 64))
    num_q_tiles = -(-max_query_len // block_q)
    max_kv_len = block_tables.shape[1] * block_size
    if num_kv_splits is None:
        num_kv_splits = _num_kv_splits(q.device, num_seqs * num_kv_heads * num_q_tiles, max_kv_len, tile_n)
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    split_size = -(-max(-(-max_kv_len // num_kv_splits), 1) // tile_n) * tile_n
    if num_kv_splits == 1:
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part_out = torch.zeros((num_kv_splits, *q.shape), dtype=torch.float32, device=q.device)
        part_lse = torch.full((num_kv_splits, num_tokens, num_heads), float("-inf"),
                              dtype=torch.float32, device=q.device)
    grid = (num_seqs, num_kv_heads, num_q_tiles * num_kv_splits)
    _paged_attention_partial_kernel[grid](
        part_out, part_lse, q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        scale * LOG2E, num_kv_splits, split_size,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=max(MIN_DOT, _next_pow2(head_dim)),
        BLOCK_SIZE=block_size, TILE_N=tile_n, CAUSAL=bool(causal),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if num_kv_splits == 1:
        return out, lse
    from kernels.triton_merge import merge_stacked_triton

    return merge_stacked_triton(part_out, part_lse, out_dtype=q.dtype)

