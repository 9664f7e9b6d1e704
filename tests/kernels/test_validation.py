"""Bad inputs raise a ValueError naming the value and the expectation, on every path, before any
kernel runs; the CPU path imports and runs without triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kernels
from tests.kernels.cases import Case, make_inputs

CASE = Case(q_lens=(1, 3), kv_lens=(20, 3))


def _attention_paths():
    paths = [("dispatch", kernels.paged_attention_partial)]
    try:
        from kernels.triton_attention import paged_attention_partial_triton
    except ImportError:
        return paths
    return paths + [("triton", paged_attention_partial_triton)]


def _bad_attention_inputs():
    """(id, mutate(args list) -> None, message fragment)"""

    def setter(i, fn):
        def mutate(a):
            a[i] = fn(a[i])
        return mutate

    return [
        ("heads", setter(0, lambda q: q[:, :7].contiguous()), "multiple of num_kv_heads"),
        ("q_dtype", setter(0, lambda q: q.half()), "must share q.s dtype"),
        ("v_dtype", setter(2, lambda v: v.double()), "must share q.s dtype"),
        ("head_dim", setter(0, lambda q: q[..., :32].contiguous()), "head_dim"),
        ("q_strided", setter(0, lambda q: q.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous in its last"),
        ("q_2d", setter(0, lambda q: q.flatten(1)), "3-D"),
        ("v_shape", setter(2, lambda v: v[:-1]), "must equal k_cache.shape"),
        ("table_dtype", setter(3, lambda t: t.float()), "block_tables.dtype"),
        ("past_pool", setter(3, lambda t: t.index_fill(1, torch.tensor([0]), 1000)), "num_blocks="),
        ("negative_table", setter(3, lambda t: t.index_fill(1, torch.tensor([0]), -1)), "num_blocks="),
        ("negative_len", setter(4, lambda n: torch.tensor([20, -1], dtype=torch.int32)), "context_lens must be >= 0"),
        ("too_long", setter(4, lambda n: torch.tensor([200, 3], dtype=torch.int32)), "block table capacity"),
        ("seqs", setter(4, lambda n: n[:1]), "num_seqs"),
        ("qsl_end", setter(5, lambda s: torch.tensor([0, 1, 3], dtype=torch.int32)), "end at num_tokens"),
        ("qsl_order", setter(5, lambda s: torch.tensor([0, 3, 1, 4][:3], dtype=torch.int32)), "query_start_loc"),
        ("scale", setter(6, lambda s: float("nan")), "scale"),
        ("block_size", lambda a: a.__setitem__(slice(1, 3), [a[1][:, :12], a[2][:, :12]]), "power of two"),
    ]


@pytest.mark.parametrize("path,fn", _attention_paths(), ids=[p for p, _ in _attention_paths()])
@pytest.mark.parametrize("name,mutate,fragment", _bad_attention_inputs(), ids=[b[0] for b in _bad_attention_inputs()])
def test_attention_rejects_bad_input(path, fn, name, mutate, fragment):
    args = list(make_inputs(CASE).args())
    mutate(args)
    with pytest.raises(ValueError, match=fragment):
        fn(*args)


def test_padding_past_a_sequence_is_not_checked():
    # Table entries past a sequence's blocks are padding: any value is fine.
    out, lse = kernels.paged_attention_partial(*make_inputs(CASE).args())
    assert not out.isnan().any() and lse.shape == (4, 8)


def test_merge_rejects_bad_states():
    out, lse = torch.zeros(2, 4, 8), torch.zeros(2, 4)
    cases = [
        ([], "non-empty"),
        ([(out, lse), (out.half(), lse)], "dtype"),
        ([(out, lse.double())], "float32"),
        ([(out, lse), (out[:1], lse[:1])], "shape"),
        ([(out, lse[:, :3])], "out.shape"),
    ]
    fns = [kernels.merge_states]
    try:
        from kernels.triton_merge import merge_states_triton
        fns.append(merge_states_triton)
    except ImportError:
        pass
    for fn in fns:
        for states, fragment in cases:
            with pytest.raises(ValueError, match=fragment):
                fn(states)


def test_store_rejects_bad_input():
    k_cache, v_cache = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    key, value, slots = torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), torch.tensor([0, 5, 63])
    cases = [
        ((key.half(), value, k_cache, v_cache, slots), "key.dtype"),
        ((key, value, k_cache, v_cache, torch.tensor([0, 5, 64])), r"slot_mapping entries"),
        ((key, value, k_cache, v_cache, torch.tensor([-1, 5, 6])), r"slot_mapping entries"),
        ((key[:, :1], value[:, :1], k_cache, v_cache, slots), "num_kv_heads"),
        ((key, value, torch.zeros(4, 16, 4, 8)[:, :, ::2], v_cache, slots), "contiguous"),
        ((key, value, k_cache, v_cache, slots[:2]), "num_tokens"),
        ((key, value, k_cache, v_cache, slots.float()), "slot_mapping.dtype"),
    ]
    fns = [kernels.store_kv]
    try:
        from kernels.triton_store import store_kv_triton
        fns.append(store_kv_triton)
    except ImportError:
        pass
    for fn in fns:
        for args, fragment in cases:
            with pytest.raises(ValueError, match=fragment):
                fn(*args)
    assert not k_cache.any()  # nothing was written


def test_cpu_path_needs_no_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "q = torch.randn(1, 4, 16); k = torch.randn(2, 16, 2, 16)\n"
        "out, lse = kernels.paged_attention_partial(q, k, k, torch.tensor([[1]], dtype=torch.int32),\n"
        "    torch.tensor([5], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 0.25)\n"
        "kernels.merge_states([(out, lse), (out, lse)])\n"
        "kernels.store_kv(q[:, :2], q[:, :2], k, k, torch.tensor([3]))\n"
        "assert 'triton' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
