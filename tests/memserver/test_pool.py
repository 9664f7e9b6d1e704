import os

import pytest
import torch

from kernels.reference import paged_attention_partial_ref
from services.memserver.messages import attend_layout
from services.memserver.pool import BlockPool, Geometry, NotOwner, OwnerCapExceeded, PoolError, PoolFull

GEO = Geometry(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")


def attend(pool, owner, layer, q, tables, context_lens, query_lens, scale):
    """pool.attention with the layout built from lists, as a worker sends it."""
    layout = attend_layout([list(t) for t in tables], list(context_lens), list(query_lens))
    return pool.attention(owner, layer, q, *layout, scale)


def test_allocate_free_and_owner_isolation():
    pool = BlockPool(GEO, num_blocks=6, per_owner_cap=4)
    a = pool.allocate("w1", 3)
    b = pool.allocate("w2", 2)
    assert set(a).isdisjoint(b) and pool.num_free == 1
    assert pool.holdings() == {"w1": 3, "w2": 2}
    with pytest.raises(NotOwner, match=f"block {b[0]} is not held by w1"):
        pool.free("w1", [b[0]])
    with pytest.raises(NotOwner):
        attend(pool, "w1", 0, torch.zeros(1, 4, 8), [[b[0]]], [4], [1], 1.0)
    with pytest.raises(PoolFull, match="2 blocks asked, 1 free"):
        pool.allocate("w2", 2)
    with pytest.raises(OwnerCapExceeded, match="would hold 3 blocks; the cap is 2"):
        BlockPool(GEO, num_blocks=6, per_owner_cap=2).allocate("w1", 3)
    assert pool.free_owner("w1") == 3 and pool.free("w2", b) == 2
    assert pool.num_free == 6 and pool.holdings() == {}


def test_attention_over_owned_blocks_matches_reference():
    torch.manual_seed(0)
    pool = BlockPool(GEO, num_blocks=8)
    ids = pool.allocate("w", 5)
    pool.kv[ids] = torch.randn(5, *GEO.block_shape)
    q = torch.randn(3, 4, 8)
    tables = [[ids[3], ids[0]], [ids[1], ids[4], ids[2]]]
    out, lse = attend(pool, "w", 1, q, tables, [8, 12], [1, 2], 0.3)
    ref_out, ref_lse = paged_attention_partial_ref(
        q, pool.kv[:, 1, 0], pool.kv[:, 1, 1], torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor([8, 12], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32), 0.3, causal=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)



def test_tables_checked_once_per_step_yet_ownership_changes_are_seen():
    """Every layer of a step sends the same tables: the pool reuses what it checked, but a block
    freed (or handed to another owner) in between is refused on the next call."""
    torch.manual_seed(0)
    pool = BlockPool(GEO, num_blocks=6)
    ids = pool.allocate("w", 3)
    pool.kv[ids] = torch.randn(3, *GEO.block_shape)
    q = torch.randn(1, 4, 8)
    tables = ((ids[2], ids[0]),)
    first = [attend(pool, "w", layer, q, tables, (8,), (1,), 0.3) for layer in (0, 1)]
    assert not torch.equal(first[0][0], first[1][0])  # each layer reads its own K/V
    for layer, (out, lse) in enumerate(first):
        again = attend(pool, "w", layer, q, [list(t) for t in tables], [8], [1], 0.3)  # same bytes: the cached plan
        assert torch.equal(again[0], out) and torch.equal(again[1], lse)
    pool.free("w", [ids[0]])
    pool.allocate("other", 1)
    with pytest.raises(NotOwner):
        attend(pool, "w", 0, q, tables, (8,), (1,), 0.3)
    with pytest.raises(PoolError, match="q has 2 rows"):
        attend(pool, "w", 0, torch.randn(2, 4, 8), ((ids[2],),), (4,), (1,), 0.3)


@pytest.mark.parametrize("tables, seq_lens, match", [
    ([[0, 1]], [[3], [8], [1]], "0 <= blocks <= width"),  # more blocks than the table holds
    ([[0, 1]], [[2], [9], [1]], "context_len <= blocks x 4"),
    ([[0, 1]], [[2], [8], [-1]], "query_len >= 0"),
    ([[0, 1]], [[2, 2], [8, 8], [1, 1]], r"seq_lens \[3, S\]"),  # two sequences announced, one table
])
def test_bad_layouts_refused_with_a_clear_error(tables, seq_lens, match):
    pool = BlockPool(GEO, num_blocks=4)
    pool.allocate("w", 2)
    with pytest.raises(PoolError, match=match):
        pool.attention("w", 0, torch.zeros(1, 4, 8), torch.tensor(tables, dtype=torch.int32),
                       torch.tensor(seq_lens, dtype=torch.int32), 1.0)
    with pytest.raises(PoolError, match="must be int32"):
        pool.attention("w", 0, torch.zeros(1, 4, 8), torch.tensor([[0, 1]]), torch.tensor([[2], [8], [1]]), 1.0)


def test_table_padding_is_ignored_even_if_it_names_foreign_blocks():
    torch.manual_seed(0)
    pool = BlockPool(GEO, num_blocks=6)
    mine, theirs = pool.allocate("w", 3), pool.allocate("other", 1)
    pool.kv[:] = torch.randn(6, *GEO.block_shape)
    q = torch.randn(2, 4, 8)
    clean = attend(pool, "w", 0, q, [[mine[0], mine[1]], [mine[2]]], [8, 4], [1, 1], 0.5)
    # row 1 is padded with another owner's block id
    tables = torch.tensor([[mine[0], mine[1]], [mine[2], theirs[0]]], dtype=torch.int32)
    dirty = pool.attention("w", 0, q, tables, torch.tensor([[2, 1], [8, 4], [1, 1]], dtype=torch.int32), 0.5)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="no CUDA device (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_pool_attention_matches_cpu_reference(dtype):
    # A GPU memserver's pool is block-major: each layer's K/V is a strided view the Triton kernel
    # must read correctly.
    geo = Geometry(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    pool = BlockPool(geo, num_blocks=40, device="cuda")
    ids = pool.allocate("w", 12)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(12, *geo.block_shape, generator=gen).to(getattr(torch, dtype))
    pool.kv[ids] = data.cuda()
    q = torch.randn(5, 8, 64, generator=gen).to(getattr(torch, dtype))
    tables = [ids[:5], ids[5:12]]
    out, lse = attend(pool, "w", 2, q.cuda(), tables, [80, 112], [1, 4], 0.125)
    cpu_kv = pool.kv.cpu().float()
    width = 7
    ref_out, ref_lse = paged_attention_partial_ref(
        q.float(), cpu_kv[:, 2, 0], cpu_kv[:, 2, 1],
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor([80, 112], dtype=torch.int32), torch.tensor([0, 1, 5], dtype=torch.int32), 0.125, causal=False)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.cpu().float(), ref_out, atol=2e-2, rtol=2e-2)
