"""The CPU merge (kernels.cpu_merge) against the torch reference and the formula in fp64."""

import pytest
import torch

import kernels
import kernels.cpu_merge as cpu_merge
from kernels.reference import merge_states_ref

NAN, INF = float("nan"), float("inf")


def _states(num_states: int, seed: int, shape=(3, 4), head_dim=16, empty_frac=0.3):
    # Far-apart lses (tiny weights too), some positions empty in some partitions, one empty in all.
    gen = torch.Generator().manual_seed(seed)
    outs = torch.randn(num_states, *shape, head_dim, generator=gen)
    lses = torch.randn(num_states, *shape, generator=gen) * 20
    lses[torch.rand(num_states, *shape, generator=gen) < empty_frac] = -INF
    lses[:, 1, 2] = -INF
    return outs, lses


def _check(states, want_out, want_lse):
    out, lse = cpu_merge.merge_states_cpu(states)
    assert out.dtype == states[0][0].dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite].double(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.double(), want_out.double(), atol=1e-5, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("num_states", [1, 2, 8, 33])
def test_merge_matches_reference_and_fp64_formula(num_states):
    outs, lses = _states(num_states, seed=num_states)
    states = [(outs[i], lses[i]) for i in range(num_states)]
    want_lse = torch.logsumexp(lses.double(), dim=0)
    weights = torch.exp(lses.double() - want_lse).nan_to_num(0.0).unsqueeze(-1)
    out, lse = _check(states, (outs.double() * weights).sum(dim=0), want_lse)
    _check(states, *merge_states_ref(states))
    assert not out.isnan().any() and torch.equal(out[1, 2], torch.zeros(16))


@pytest.mark.parametrize("host_check_max", [4096, 0], ids=["lses-read", "always-guarded"])
def test_garbage_of_empty_partitions_is_ignored_and_real_nan_propagates(host_check_max, monkeypatch):
    monkeypatch.setattr(cpu_merge, "_HOST_CHECK_MAX", host_check_max)
    outs, lses = _states(3, seed=7, empty_frac=0.0)
    lses[0, 0, 1] = -INF
    outs[0, 0, 1] = NAN  # garbage where partition 0 saw nothing
    outs[2, 2, 3, 0] = INF
    lses[2, 2, 3] = -INF
    outs[1, 0, 0, 5] = NAN  # a partition that saw tokens: its NaN is real and must show
    states = [(outs[i], lses[i]) for i in range(3)]
    out, lse = cpu_merge.merge_states_cpu(states)
    ref_out, ref_lse = merge_states_ref(states)
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert out.isnan().sum() == 1 and out[0, 0, 5].isnan()
    keep = ~ref_out.isnan()
    torch.testing.assert_close(out[keep], ref_out[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse)


def test_all_empty_is_the_identity_and_no_partition_empty_needs_no_guard():
    empty = (torch.full((2, 3, 8), NAN), torch.full((2, 3), -INF))
    out, lse = kernels.merge_states([empty, (torch.zeros(2, 3, 8), torch.full((2, 3), -INF))])
    assert torch.equal(out, torch.zeros(2, 3, 8)) and torch.isneginf(lse).all()
    outs, lses = _states(4, seed=3, empty_frac=0.0)
    lses[:, 1, 2] = 0.0
    states = [(outs[i], lses[i]) for i in range(4)]
    _check(states, *merge_states_ref(states))


def test_bf16_outs_merge_in_fp32_and_cast_once():
    outs, lses = _states(5, seed=11)
    states = [(outs[i].bfloat16(), lses[i]) for i in range(5)]
    out, lse = cpu_merge.merge_states_cpu(states)
    ref_out, ref_lse = merge_states_ref(states)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pair_with_tokens_everywhere_matches_the_formula(dtype):
    # The usual remote + local pair takes a shorter path than the general merge.
    gen = torch.Generator().manual_seed(17)
    outs = torch.randn(2, 5, 4, 16, generator=gen)
    lses = torch.randn(2, 5, 4, generator=gen) * 20  # far apart too: weights near 0 and 1
    states = [(outs[i].to(dtype), lses[i]) for i in range(2)]
    want_lse = torch.logsumexp(lses.double(), dim=0)
    want_out = (outs.to(dtype).double() * torch.exp(lses.double() - want_lse).unsqueeze(-1)).sum(dim=0)
    out, lse = cpu_merge.merge_states_cpu(states)
    assert out.dtype == dtype
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
