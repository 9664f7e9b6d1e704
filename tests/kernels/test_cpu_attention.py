"""The CPU decode fast path (fused flash kernel) against the torch reference."""

import pytest
import torch

from kernels import paged_attention_partial
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
