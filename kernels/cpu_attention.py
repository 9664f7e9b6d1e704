"""Fast CPU paths over PyTorch's fused CPU flash-attention kernel (it also returns the log-sum-exp).

Decode (one query per sequence): gather each sequence's blocks once, mask the padded tail, one
fused call for the whole batch. Prefill chunks: per sequence, one unmasked call over the earlier
cached tokens (every query sees them all; query heads grouped by KV head, so K/V are not repeated)
and one causal call over the chunk's own tokens, merged: no [q_len, kv_len] mask is built or read
(a 16K-token prompt in 256-token chunks prefilled 25-30% faster than with the mask). A batch mixing both
(continuous batching) runs its decode sequences through the batched decode path. What does not
depend on the layer — host copies of the lengths, gather indices, masks — is computed once per
forward pass in a `CpuAttentionPlan` and reused by every layer. The plain-torch reference
(kernels.reference) stays the oracle; tests/kernels/test_cpu_attention.py compares them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.cpu_merge import merge_states_cpu

NEG_INF = float("-inf")
_FLASH_DTYPES = (torch.float32, torch.bfloat16)
# Decode gathers K (and V) in pieces of about this size, each attended to while it is still in
# cache, and merges the pieces' (out, lse) exactly; one gather of a long context would stream it
# through memory twice. 1 MiB (1024 tokens of 2 fp32 KV heads of 128): the fused kernel runs as
# fast per token as at 512 tokens, and at 2048 at half that speed (K and V out of cache); 2 MiB
# allocations also page-faulted in afresh on every call.
_GATHER_BYTES = 1 << 20


def is_decode(num_tokens: int, query_starts: list[int]) -> bool:
    return num_tokens == len(query_starts) - 1 and query_starts == list(range(num_tokens + 1))


@dataclass(frozen=True, slots=True)
class _DecodeGather:
    # [S * num_blocks] block ids in the table's int dtype, padding clamped to a valid block; may view
    # the caller's table (callers build a table per step and never write it while its plan is in use)
    ids: torch.Tensor
    width: int  # num_blocks * block_size: KV rows gathered per sequence
    mask: torch.Tensor | None  # [S, 1, 1, width] additive (0 / -inf), None when every row is full
    empty: torch.Tensor | None  # [S] bool: sequences with no visible token, None if there are none
    # One sequence whose blocks are run_start, run_start + 1, ... (a FIFO allocator hands a lone
    # stream consecutive ids): attention reads them in place, no gather
    run_start: int | None = None


@dataclass(frozen=True, slots=True)
class _PrefillSeq:
    start: int  # first query row of the sequence in the packed q
    end: int
    ids: torch.Tensor  # [num_blocks] int64
    kv_len: int
    # The leading tokens every query sees (a chunk's earlier context, or all of them without
    # causality): one fused call with no mask, each KV head's query heads as its query rows. The
    # other tokens (a causal chunk's own) go through a causal call; the two states are merged.
    history_len: int
    bias: torch.Tensor | None = None  # [1, 1, q_len, kv_len] additive, for the rare q_len > kv_len (causal)


@dataclass(frozen=True, slots=True)
class CpuAttentionPlan:
    """Layer-independent inputs of one forward pass, read to the host and checked once."""

    context_lens: list[int]
    query_starts: list[int]
    decode: tuple[_DecodeGather, ...] | None  # the sequences with exactly one query, if any
    prefill: tuple[_PrefillSeq, ...] | None  # the others; None when every sequence decodes
    dtype: torch.dtype
    # [num decode sequences] int64: their query rows, when the batch also has prefill chunks
    decode_rows: torch.Tensor | None = None


def plan_cpu_attention(
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    context_lens: list[int],
    query_starts: list[int],
    pool_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    causal: bool,
    block_bytes: int = 0,
) -> CpuAttentionPlan:
    """block_bytes: one block of one K (or V) cache, sizing the decode gather pieces (0: one piece)."""
    num_seqs = len(context_lens)
    if dtype not in _FLASH_DTYPES or not num_seqs:
        return CpuAttentionPlan(context_lens, query_starts, None, None, dtype)
    if is_decode(query_starts[-1], query_starts):
        decode = _plan_decode(block_tables, context_lens, pool_blocks, block_size, dtype, block_bytes)
        return CpuAttentionPlan(context_lens, query_starts, decode, None, dtype)
    # Sequences with a single query (it sees every cached token, causal or not) decode together;
    # a lone one is as cheap through the prefill path.
    singles = [i for i in range(num_seqs) if query_starts[i + 1] - query_starts[i] == 1]
    singles = singles if len(singles) > 1 else []
    prefill = tuple(_plan_prefill(block_tables, context_lens, query_starts, block_size, dtype, causal,
                                  skip=frozenset(singles)))
    decode = rows = None
    if singles:
        decode = _plan_decode(block_tables.index_select(0, torch.tensor(singles)),
                              [context_lens[i] for i in singles], pool_blocks, block_size, dtype, block_bytes)
        rows = torch.tensor([query_starts[i] for i in singles])
    return CpuAttentionPlan(context_lens, query_starts, decode, prefill, dtype, rows)


def _plan_decode(block_tables, context_lens, pool_blocks, block_size, dtype, block_bytes):
    num_seqs, max_len = len(context_lens), max(context_lens)
    if max_len == 0:  # the fused kernel divides by the key length
        return None
    num_blocks = (max_len + block_size - 1) // block_size
    step = max(1, _GATHER_BYTES // (num_seqs * block_bytes)) if block_bytes else num_blocks
    # int32 ids index as they are. Padding entries past a shorter sequence's length are masked:
    # clamp so any value is a safe index. Without padding every entry is a used block, which
    # index_select bounds-checks (and the value checks already did).
    tables = block_tables if block_tables.shape[1] == num_blocks else block_tables[:, :num_blocks]
    if min(context_lens) <= (num_blocks - 1) * block_size:
        tables = tables.clamp(0, pool_blocks - 1)
    if step >= num_blocks:  # one piece: most calls, planned in the fewest tensor ops
        return (_decode_piece(tables, context_lens, block_size, dtype),)
    if num_seqs == 1:
        # A run is read in place, so there is no gathered copy to keep in cache: one fused call
        # streams it once (6K tokens cold: 0.85 ms, vs 1.13 ms in 2 pieces and their merge).
        whole = _decode_piece(tables, context_lens, block_size, dtype)
        if whole.run_start is not None:
            return (whole,)
    return tuple(_decode_piece(tables[:, c:c + step], [n - c * block_size for n in context_lens], block_size, dtype)
                 for c in range(0, num_blocks, step))


def _decode_piece(tables, lens: list[int], block_size, dtype) -> _DecodeGather:
    # tables: [S, n] block columns of this piece; lens: tokens of each sequence from its first column on
    num_seqs, width = tables.shape[0], tables.shape[1] * block_size
    visible = [min(max(n, 0), width) for n in lens]
    mask = empty = None
    if min(visible) < width:
        hidden = torch.arange(width).view(1, -1) >= torch.tensor(visible).view(-1, 1)  # [S, width]
        mask = torch.zeros(num_seqs, 1, 1, width, dtype=dtype).masked_fill_(hidden.view(num_seqs, 1, 1, -1), NEG_INF)
    if min(visible) == 0:
        empty = torch.tensor([v == 0 for v in visible])
    ids = tables.reshape(-1)
    run_start = None
    if num_seqs == 1 and (ids.shape[0] == 1 or bool((ids.diff() == 1).all())):
        run_start = int(ids[0])
    return _DecodeGather(ids, width, mask, empty, run_start)


def _plan_prefill(block_tables, context_lens, query_starts, block_size, dtype, causal, skip=frozenset()):
    for i, kv_len in enumerate(context_lens):
        start, end = query_starts[i], query_starts[i + 1]
        q_len = end - start
        if q_len == 0 or kv_len == 0 or i in skip:
            continue  # its rows keep (0, -inf)
        ids = block_tables[i, : (kv_len + block_size - 1) // block_size].long()
        if not causal:
            yield _PrefillSeq(start, end, ids, kv_len, kv_len)
        elif q_len <= kv_len:  # query j sees tokens k <= kv_len - q_len + j: all earlier ones, then its chunk's
            yield _PrefillSeq(start, end, ids, kv_len, kv_len - q_len)
        else:  # more queries than tokens: the first ones see nothing
            visible = torch.arange(kv_len).view(1, -1) <= torch.arange(q_len).view(-1, 1) + (kv_len - q_len)
            bias = torch.zeros(1, 1, q_len, kv_len, dtype=dtype).masked_fill_(~visible, NEG_INF)
            yield _PrefillSeq(start, end, ids, kv_len, 0, bias)


def paged_attention_cpu(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    plan: CpuAttentionPlan,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out, lse) through the fused kernel, or None when the plan has no fast path for q."""
    if q.dtype != plan.dtype:
        return None
    if plan.prefill is None:
        return None if plan.decode is None else _decode(q, k_cache, v_cache, plan.decode, scale)
    out, lse = _prefill(q, k_cache, v_cache, plan.prefill, scale)
    if plan.decode is not None:  # a mixed batch: its decode rows in one batched call
        rows = plan.decode_rows
        dec_out, dec_lse = _decode(q.index_select(0, rows), k_cache, v_cache, plan.decode, scale)
        out.index_copy_(0, rows, dec_out)
        lse.index_copy_(0, rows, dec_lse)
    return out, lse


def _decode(q, k_cache, v_cache, pieces: tuple[_DecodeGather, ...], scale):
    if len(pieces) == 1:
        return _decode_one(q, k_cache, v_cache, pieces[0], scale)
    # One K and one V buffer serve every piece: a fresh ~1 MiB allocation per piece is handed back
    # to the OS on free and page-faults in again (64K tokens over 2 partitions: ~14K faults, half the time).
    rows = pieces[0].ids.shape[0]  # the first piece is the widest
    k_buf, v_buf = k_cache.new_empty((rows, *k_cache.shape[1:])), v_cache.new_empty((rows, *v_cache.shape[1:]))
    return merge_states_cpu([_decode_one(q, k_cache, v_cache, g, scale, k_buf, v_buf) for g in pieces])


def _decode_one(q, k_cache, v_cache, g: _DecodeGather, scale, k_buf=None, v_buf=None):
    # Runs once per partition, layer and step, its code often evicted by the KV it just streamed:
    # each tensor op then costs several times its warm ~1 us, hence as_strided, not view + transpose.
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    # k, v: [S, Hkv, width, D], strided views of the gathered [S * n, block_size, Hkv, D] blocks
    shape = (num_seqs, num_kv_heads, g.width, head_dim)
    strides = (g.width * num_kv_heads * head_dim, head_dim, num_kv_heads * head_dim, 1)
    # A run is read in place where a layer's pool is contiguous (the worker's and a memory
    # server's both are); a strided pool gathers.
    if g.run_start is not None and k_cache.is_contiguous() and v_cache.is_contiguous():
        k_blocks = k_cache.narrow(0, g.run_start, g.ids.shape[0])
        v_blocks = v_cache.narrow(0, g.run_start, g.ids.shape[0])
    else:
        k_blocks, v_blocks = _gather(k_cache, g.ids, k_buf), _gather(v_cache, g.ids, v_buf)
    if k_blocks.dtype != q.dtype:  # an fp8 cache: computed in q's dtype (contiguous copies, same layout)
        k_blocks, v_blocks = upcast(k_blocks, q.dtype), upcast(v_blocks, q.dtype)
    k, v = k_blocks.as_strided(shape, strides), v_blocks.as_strided(shape, strides)
    # The query heads sharing a KV head ride as that head's query rows: no K/V expansion for GQA.
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg, k, v, 0.0, False, attn_mask=g.mask, scale=scale
    )[:2]
    # out: [S, Hkv, G, D] (contiguous: a view); lse: [S, Hkv, G] fp32 for fp32 and bf16 alike
    out = out.reshape(num_seqs, num_heads, head_dim)
    lse = lse.reshape(num_seqs, num_heads)
    if g.empty is not None:  # fully masked rows: whatever the kernel made of them becomes (0, -inf)
        out = out.masked_fill(g.empty.view(-1, 1, 1), 0.0)
        lse = lse.masked_fill(g.empty.view(-1, 1), NEG_INF)
    return out, lse


_UPCAST_TABLES: dict[tuple[torch.dtype, torch.dtype], torch.Tensor] = {}


def upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype) for a contiguous 8-bit float tensor, through a 256-entry table: torch's fp8
    conversion is scalar code on CPU (~3x slower than this gather). Other dtypes: t.to(dtype)."""
    if t.element_size() != 1 or not t.is_contiguous():
        return t.to(dtype)
    table = _UPCAST_TABLES.get((t.dtype, dtype))
    if table is None:
        table = _UPCAST_TABLES[t.dtype, dtype] = torch.arange(256, dtype=torch.uint8).view(t.dtype).to(dtype)
    return table.index_select(0, t.view(torch.uint8).reshape(-1).int()).view(t.shape)


def _gather(cache, ids, buf):
    # -> [len(ids), block_size, Hkv, D] contiguous: into buf's first rows when given
    if buf is None:
        return cache.index_select(0, ids)
    return torch.index_select(cache, 0, ids, out=buf.narrow(0, 0, ids.shape[0]))


def _prefill(q, k_cache, v_cache, seqs: tuple[_PrefillSeq, ...], scale):
    num_tokens, num_heads, _ = q.shape
    group = num_heads // k_cache.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((num_tokens, num_heads), NEG_INF, dtype=torch.float32)
    for s in seqs:
        qs = q[s.start:s.end]  # [q_len, H, D]
        k = upcast(k_cache.index_select(0, s.ids).flatten(0, 1)[: s.kv_len], q.dtype)  # [kv_len, Hkv, D]
        v = upcast(v_cache.index_select(0, s.ids).flatten(0, 1)[: s.kv_len], q.dtype)
        states = []
        if s.history_len:
            states.append(_attend_grouped(qs, k[: s.history_len], v[: s.history_len], scale))
        if s.history_len < s.kv_len:
            # [1, H, n, D], KV heads repeated for their query heads (causal rows need per-head rows)
            k_own = k[s.history_len:].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
            v_own = v[s.history_len:].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qs.transpose(0, 1).unsqueeze(0), k_own, v_own, 0.0, s.bias is None, attn_mask=s.bias, scale=scale,
            )[:2]
            states.append((o[0].transpose(0, 1), l[0].transpose(0, 1).float()))  # [q_len, H, D], [q_len, H]
        # earlier tokens first, then the chunk's own: a fixed order
        out[s.start:s.end], lse[s.start:s.end] = states[0] if len(states) == 1 else merge_states_cpu(states)
    return out, lse


def _attend_grouped(q, k, v, scale):
    """q [q_len, H, D] over k, v [n, Hkv, D] with no mask -> (out [q_len, H, D], lse [q_len, H]).
    A KV head's G query heads ride as its G * q_len query rows: K and V are read in place (a
    strided view), not repeated per query head."""
    q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, num_kv_heads, -1, head_dim)
    o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg, k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0), 0.0, False, scale=scale,
    )[:2]
    # o: [1, Hkv, G * q_len, D], l: [1, Hkv, G * q_len]
    out = o.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
    return out, l.view(num_kv_heads, group, q_len).permute(2, 0, 1).reshape(q_len, num_heads).float()


def paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens: list[int], scale):
    """Decode attention for one-query-per-sequence q: out = softmax(q k^T * scale) v over each
    sequence's first context_lens[s] tokens, and its lse (fp32); no visible token gives (0, -inf)."""
    num_seqs = len(context_lens)
    plan = plan_cpu_attention(block_tables, context_lens, list(range(num_seqs + 1)), k_cache.shape[0],
                              k_cache.shape[1], q.dtype, causal=False, block_bytes=block_bytes(k_cache))
    if plan.decode is None:
        return torch.zeros_like(q), torch.full(q.shape[:2], NEG_INF, dtype=torch.float32)
    return _decode(q, k_cache, v_cache, plan.decode, scale)


def block_bytes(k_cache: torch.Tensor) -> int:
    return math.prod(k_cache.shape[1:]) * k_cache.element_size()  # from the shape: no tensor op
