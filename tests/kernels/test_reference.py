"""The torch reference (the oracle and the CPU path) against independent formulations:
torch SDPA over each sequence's gathered KV, and attention over concatenated KV for the merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import merge_states_ref, paged_attention_partial_ref, store_kv_ref
from tests.kernels.cases import Case, make_inputs

CASES = [
    Case(q_lens=(1, 1, 1, 1), kv_lens=(37, 1, 0, 64)),  # decode batch, empty and single-token
    Case(q_lens=(1, 1), kv_lens=(100, 17), num_heads=8, num_kv_heads=1, head_dim=32),  # MQA
    Case(q_lens=(5, 3), kv_lens=(5, 40), num_heads=4, num_kv_heads=4, block_size=32),  # prefill
    Case(q_lens=(1, 4, 0, 6), kv_lens=(33, 4, 10, 20), head_dim=80, block_size=8),  # mixed
    Case(q_lens=(4,), kv_lens=(2,), num_heads=8, num_kv_heads=8),  # chunk longer than partition
]


def _sdpa_oracle(inp, case: Case, causal: bool):
    """Per sequence: gather KV by hand, build the bottom-right mask, call SDPA (fp64)."""
    outs, lses = [], []
    starts = inp.query_start_loc.tolist()
    group = case.num_heads // case.num_kv_heads
    for i, kv_len in enumerate(case.kv_lens):
        q = inp.q[starts[i]:starts[i + 1]].double()  # [q_len, H, D]
        q_len = q.shape[0]
        rows = [inp.block_tables[i, t // case.block_size].item() for t in range(kv_len)]
        slots = [t % case.block_size for t in range(kv_len)]
        k = inp.k_cache[rows, slots].double().repeat_interleave(group, dim=1)  # [kv, H, D]
        v = inp.v_cache[rows, slots].double().repeat_interleave(group, dim=1)
        mask = torch.ones(q_len, kv_len, dtype=torch.bool)
        if causal:
            mask = torch.arange(kv_len).view(1, -1) <= torch.arange(q_len).view(-1, 1) + kv_len - q_len
        scores = torch.einsum("qhd,khd->hqk", q, k) * inp.scale
        lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1).T  # [q, H]
        out = torch.zeros_like(q)
        visible = mask.any(dim=1)
        if visible.any() and kv_len > 0:
            o = F.scaled_dot_product_attention(
                q[visible].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=mask[visible], scale=inp.scale)
            out[visible] = o.transpose(0, 1)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_sdpa(case, causal):
    inp = make_inputs(case)
    out, lse = paged_attention_partial_ref(*inp.args(), causal=causal)
    want_out, want_lse = _sdpa_oracle(inp, case, causal)
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)


def test_merge_equals_attention_over_concatenated_kv():
    # Split one sequence's KV into partitions (one empty); merged partials == attention over all.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 16, generator=gen)
    k = torch.randn(30, 4, 16, generator=gen)
    v = torch.randn(30, 4, 16, generator=gen)
    bounds = [(0, 7), (7, 7), (7, 8), (8, 30)]  # includes an empty and a single-token partition
    states = []
    for lo, hi in bounds:
        scores = torch.einsum("qhd,khd->qhk", q, k[lo:hi]) * 0.25
        lse = torch.logsumexp(scores, -1) if hi > lo else torch.full((3, 4), float("-inf"))
        out = torch.einsum("qhk,khd->qhd", torch.softmax(scores, -1), v[lo:hi]) if hi > lo else torch.zeros(3, 4, 16)
        states.append((out, lse))
    out, lse = merge_states_ref(states)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=0.25)
    torch.testing.assert_close(out, want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(torch.einsum("qhd,khd->qhk", q, k) * 0.25, -1))


def test_merge_of_only_empty_states_is_identity_without_nan():
    empty = (torch.full((2, 3, 8), float("nan")), torch.full((2, 3), float("-inf")))
    out, lse = merge_states_ref([empty, (torch.zeros(2, 3, 8), torch.full((2, 3), float("-inf")))])
    assert torch.equal(out, torch.zeros(2, 3, 8)) and torch.isneginf(lse).all()


def test_store_kv_ref_writes_slots():
    k_cache = torch.zeros(4, 8, 2, 16)
    v_cache = torch.zeros(4, 8, 2, 16)
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    store_kv_ref(key, value, k_cache, v_cache, torch.tensor([31, 0, 9], dtype=torch.int32))
    for t, slot in enumerate([31, 0, 9]):
        assert torch.equal(k_cache[slot // 8, slot % 8], key[t])
        assert torch.equal(v_cache[slot // 8, slot % 8], value[t])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3


def test_merge_ignores_garbage_in_empty_partitions():
    out_a, lse_a = torch.randn(2, 3, 8), torch.randn(2, 3)
    garbage = (torch.full((2, 3, 8), float("nan")), torch.full((2, 3), float("-inf")))
    out, lse = merge_states_ref([garbage, (out_a, lse_a), garbage])
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
