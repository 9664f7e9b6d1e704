"""The CPU decode fast path (fused flash kernel) against the torch reference."""

import pytest
import torch

from kernels import paged_attention_partial, plan_paged_attention
from kernels.cpu_attention import paged_decode_attention_cpu
from kernels.reference import paged_attention_partial_ref
from tests.kernels.cases import Case, assert_states_close, make_inputs

CASES = [
    Case((1,) * 4, (37, 1, 160, 16)),
    Case((1,) * 3, (0, 5, 33)),  # an empty partition among others
    Case((1,) * 2, (0, 0)),  # nothing visible anywhere
    Case((1,) * 3, (70, 9, 64), num_heads=8, num_kv_heads=8),  # MHA
    Case((1,) * 3, (70, 9, 64), num_heads=8, num_kv_heads=1),  # MQA
    Case((1,) * 2, (100, 31), head_dim=32, block_size=1),
    Case((1,) * 2, (100, 31), head_dim=80, block_size=32),
    Case((1,) * 3, (48, 17, 130), head_dim=128, dtype=torch.bfloat16),
    Case((1,) * 2, (64, 64), shuffle=False),  # every sequence full: no mask
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_decode_matches_reference(case):
    x = make_inputs(case)
    ref = paged_attention_partial_ref(*x.args())
    out, lse = paged_decode_attention_cpu(x.q, x.k_cache, x.v_cache, x.block_tables, x.context_lens.tolist(), x.scale)
    assert_states_close(out, lse, *ref, case.dtype)


def test_dispatch_uses_it_for_decode_only():
    decode = make_inputs(Case((1,) * 2, (20, 40)))
    prefill = make_inputs(Case((3, 1), (20, 40)))
    for x in (decode, prefill):
        out, lse = paged_attention_partial(*x.args())
        assert_states_close(out, lse, *paged_attention_partial_ref(*x.args()), torch.float32)


PREFILL_CASES = [
    Case((5, 1, 16), (5, 40, 16)),  # fresh prompt, decode row, chunk after cached tokens
    Case((7, 0, 3), (30, 0, 3)),  # a sequence with no query and no KV
    Case((9, 4), (9, 20), num_heads=8, num_kv_heads=8),
    Case((9, 4), (9, 20), num_heads=8, num_kv_heads=1),
    Case((33, 2), (33, 70), head_dim=80, block_size=32),
    Case((12, 3), (12, 50), head_dim=128, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "older-partition"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=str)
def test_fast_prefill_matches_reference(case, causal):
    x = make_inputs(case)
    out, lse = paged_attention_partial(*x.args(), causal=causal)
    assert_states_close(out, lse, *paged_attention_partial_ref(*x.args(), causal=causal), case.dtype)


MIXED_CASES = [
    Case((1, 5, 1, 1), (40, 5, 170, 3)),  # decode rows around a fresh prompt
    Case((1, 3, 1, 0, 1), (0, 50, 1, 0, 33)),  # an empty decode row, a sequence with no query
    Case((1, 1, 9), (0, 0, 9)),  # no decode row sees anything
    Case((16, 1, 1), (48, 130, 17), head_dim=128, dtype=torch.bfloat16),
    Case((1, 4, 1), (70, 20, 9), num_heads=8, num_kv_heads=1),  # MQA
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "older-partition"])
@pytest.mark.parametrize("case", MIXED_CASES, ids=str)
def test_mixed_batch_decodes_its_single_query_rows_together(case, causal):
    """Continuous batching mixes decode rows with prefill chunks: the decode rows go through the
    batched decode path (one gather, one fused call) and land in their own rows."""
    x = make_inputs(case)
    plan = plan_paged_attention(x.block_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype, causal)
    singles = [i for i, n in enumerate(case.q_lens) if n == 1]
    assert plan.decode_rows.tolist() == [sum(case.q_lens[:i]) for i in singles]
    assert all(s.end - s.start > 1 for s in plan.prefill)
    out, lse = paged_attention_partial(*x.args(), causal=causal, plan=plan)
    assert_states_close(out, lse, *paged_attention_partial_ref(*x.args(), causal=causal), case.dtype)


def test_mixed_batch_decode_rows_gathered_in_pieces(monkeypatch):
    import kernels.cpu_attention as cpu

    monkeypatch.setattr(cpu, "_GATHER_BYTES", 4096)
    x = make_inputs(Case((1, 6, 1), (300, 6, 170)))
    plan = plan_paged_attention(x.block_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    assert len(plan.decode) > 2
    out, lse = paged_attention_partial(*x.args(), plan=plan)
    assert_states_close(out, lse, *paged_attention_partial_ref(*x.args()), torch.float32)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], PREFILL_CASES[0], PREFILL_CASES[4]], ids=str)
def test_plan_is_shared_by_layers(case):
    """One plan per forward pass serves every layer's pool (same tables and lengths)."""
    x = make_inputs(case)
    plan = plan_paged_attention(x.block_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    for layer_seed in (1, 2):
        other = make_inputs(case, seed=layer_seed)  # same geometry and tables, other values
        args = (other.q, other.k_cache, other.v_cache, x.block_tables, x.context_lens, x.query_start_loc, x.scale)
        out, lse = paged_attention_partial(*args, plan=plan)
        assert_states_close(out, lse, *paged_attention_partial_ref(*args), case.dtype)


def test_plan_checks_values_once_and_rejects_a_mismatched_q():
    x = make_inputs(Case((1,) * 2, (20, 40)))
    bad_tables = x.block_tables.clone()
    bad_tables[0, 0] = 10**6
    with pytest.raises(ValueError, match="block_tables entries"):
        plan_paged_attention(bad_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    plan = plan_paged_attention(x.block_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    with pytest.raises(ValueError, match="the plan covers 2 query tokens"):
        paged_attention_partial(x.q[:1], *x.args()[1:], plan=plan)


@pytest.mark.parametrize("case", [
    Case((1,) * 3, (300, 5, 170)),  # a short sequence sees nothing in the later pieces
    Case((1,) * 2, (0, 257), dtype=torch.bfloat16),
    Case((1,), (1000,), block_size=32),
], ids=str)
def test_long_decode_is_gathered_in_pieces_and_merged_exactly(case, monkeypatch):
    import kernels.cpu_attention as cpu

    monkeypatch.setattr(cpu, "_GATHER_BYTES", 4096)  # a few blocks a piece
    x = make_inputs(case)
    plan = plan_paged_attention(x.block_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    assert len(plan.decode) > 2
    out, lse = paged_attention_partial(*x.args(), plan=plan)
    assert_states_close(out, lse, *paged_attention_partial_ref(*x.args()), case.dtype)


@pytest.mark.parametrize("kv_lens", [(64, 64), (64,), (160, 150)], ids=str)
def test_decode_over_tables_exactly_as_wide_as_the_blocks(kv_lens):
    """A memory server's partition: no padding column, so the int32 ids go to index_select as they
    are (no slice, no clamp when every row reaches the last column)."""
    x = make_inputs(Case((1,) * len(kv_lens), kv_lens))
    tables = x.block_tables[:, : -(-max(kv_lens) // 16)].contiguous()
    args = (x.q, x.k_cache, x.v_cache, tables, x.context_lens, x.query_start_loc, x.scale)
    out, lse = paged_attention_partial(*args)
    assert_states_close(out, lse, *paged_attention_partial_ref(*args), torch.float32)


def test_decode_pieces_share_one_buffer_and_the_last_piece_is_narrower(monkeypatch):
    """Pieces of 2 block columns over 5 columns: the last gathers into the first rows of the shared
    K/V buffers; every sequence's tokens of every piece must land in the merge."""
    import kernels.cpu_attention as cpu

    case = Case((1,) * 3, (80, 33, 65))  # 5, 3 and 5 blocks of 16
    x = make_inputs(case)
    monkeypatch.setattr(cpu, "_GATHER_BYTES", 2 * 3 * cpu.block_bytes(x.k_cache))
    plan = plan_paged_attention(x.block_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    assert [g.width for g in plan.decode] == [32, 32, 16]
    out, lse = paged_attention_partial(*x.args(), plan=plan)
    assert_states_close(out, lse, *paged_attention_partial_ref(*x.args()), case.dtype)


@pytest.mark.parametrize("kv_len,gather_bytes", [(1, 0), (40, 0), (300, 0), (300, 4096)], ids=str)
def test_a_lone_sequence_on_consecutive_blocks_is_read_in_place(kv_len, gather_bytes, monkeypatch):
    """A single stream's blocks are usually consecutive ids: no gather, one fused call however long
    the run, the same states as the reference; a pool strided by layer still gathers."""
    import kernels.cpu_attention as cpu

    if gather_bytes:
        monkeypatch.setattr(cpu, "_GATHER_BYTES", gather_bytes)
    x = make_inputs(Case((1,), (kv_len,), shuffle=False))
    num_blocks = -(-kv_len // 16)
    tables = torch.arange(2, 2 + num_blocks, dtype=torch.int32).view(1, -1)  # a run not starting at 0
    args = (x.q, x.k_cache, x.v_cache, tables, x.context_lens, x.query_start_loc, x.scale)
    plan = plan_paged_attention(tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    assert len(plan.decode) == 1 and plan.decode[0].run_start == 2  # in place: no pieces to keep in cache
    ref = paged_attention_partial_ref(*args)
    assert_states_close(*paged_attention_partial(*args, plan=plan), *ref, torch.float32)
    # the same blocks in a pool that holds two layers per block: per-layer views are not contiguous
    stacked = torch.stack([x.k_cache, torch.full_like(x.k_cache, 7.0)], dim=1)  # [N, 2, bs, Hkv, D]
    k_layer = stacked[:, 0]
    assert not k_layer.is_contiguous()
    strided = (x.q, k_layer, x.v_cache, tables, x.context_lens, x.query_start_loc, x.scale)
    assert_states_close(*paged_attention_partial(*strided, plan=plan), *ref, torch.float32)


def test_shuffled_or_batched_blocks_are_gathered():
    x = make_inputs(Case((1,), (300,)))  # shuffled ids
    plan = plan_paged_attention(x.block_tables, x.context_lens, x.query_start_loc, x.k_cache, x.q.dtype)
    assert plan.decode[0].run_start is None
    y = make_inputs(Case((1, 1), (40, 40), shuffle=False))
    plan = plan_paged_attention(y.block_tables, y.context_lens, y.query_start_loc, y.k_cache, y.q.dtype)
    assert plan.decode[0].run_start is None  # two sequences: one batched gather
