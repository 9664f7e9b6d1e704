import os

import pytest
import torch

from kernels.reference import paged_attention_partial_ref
from services.memserver.messages import attend_layout
from services.memserver.pool import BlockPool, Geometry, NotOwner, OwnerCapExceeded, PoolError, PoolFull

GEO = Geometry(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")


def fill(pool, block_ids, data):
    """Store data [n, L, 2, bs, Hkv, D] (block by block) into block_ids as a StoreBlocks does."""
    buffers = pool.receive_buffers(block_ids)
    for i, buffer in enumerate(buffers):  # frame 2 * layer + kv
        buffer.copy_(data[:, i // 2, i % 2])
    pool.place(block_ids, buffers)


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


@pytest.mark.parametrize("fragmented", [False, True])
def test_attention_over_owned_blocks_matches_reference(fragmented):
    """Stored blocks read back right whether they landed in place (consecutive ids) or through
    staging (a fragmented pool): the oracle indexes the data as sent, not the pool."""
    torch.manual_seed(0)
    pool = BlockPool(GEO, num_blocks=12)
    if fragmented:  # free blocks 1, 3, 5, 7, 9: no two consecutive
        others = pool.allocate("other", 12)
        pool.free("other", others[1:10:2])
    ids = pool.allocate("w", 5)
    assert (ids == [1, 3, 5, 7, 9]) if fragmented else (ids == [0, 1, 2, 3, 4])
    data = torch.randn(5, *GEO.block_shape)
    fill(pool, ids, data)
    q = torch.randn(3, 4, 8)
    picks = [[3, 0], [1, 4, 2]]  # positions in data
    tables = [[ids[i] for i in p] for p in picks]
    out, lse = attend(pool, "w", 1, q, tables, [8, 12], [1, 2], 0.3)
    ref_out, ref_lse = paged_attention_partial_ref(
        q, data[:, 1, 0], data[:, 1, 1], torch.tensor([p + [0] * (3 - len(p)) for p in picks], dtype=torch.int32),
        torch.tensor([8, 12], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32), 0.3, causal=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_allocation_prefers_the_lowest_consecutive_run_and_receives_in_place():
    pool = BlockPool(GEO, num_blocks=8)
    first = pool.allocate("w", 3)
    pool.allocate("w", 2)
    pool.free("w", [first[1]])  # free: 1, 5, 6, 7
    run = pool.allocate("w", 3)
    assert run == [5, 6, 7]
    buffers = pool.receive_buffers(run)
    assert len(buffers) == 2 * GEO.num_layers
    assert all(b.data_ptr() == pool.kv[i // 2, i % 2, 5].data_ptr() for i, b in enumerate(buffers))  # zero-copy
    pool.free("w", [3])  # free: 1, 3
    assert pool.allocate("w", 2) == [1, 3] and pool.num_free == 0
    assert pool.receive_buffers([1, 3])[0].data_ptr() != pool.kv[0, 0, 1].data_ptr()  # staged


def test_tables_checked_once_per_step_yet_ownership_changes_are_seen():
    """Every layer of a step sends the same tables: the pool reuses what it checked, but a block
    freed (or handed to another owner) in between is refused on the next call."""
    torch.manual_seed(0)
    pool = BlockPool(GEO, num_blocks=6)
    ids = pool.allocate("w", 3)
    fill(pool, ids, torch.randn(3, *GEO.block_shape))
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
    pool.kv.normal_()
    q = torch.randn(2, 4, 8)
    clean = attend(pool, "w", 0, q, [[mine[0], mine[1]], [mine[2]]], [8, 4], [1, 1], 0.5)
    # row 1 is padded with another owner's block id
    tables = torch.tensor([[mine[0], mine[1]], [mine[2], theirs[0]]], dtype=torch.int32)
    dirty = pool.attention("w", 0, q, tables, torch.tensor([[2, 1], [8, 4], [1, 1]], dtype=torch.int32), 0.5)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="no CUDA device (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype, compute_dtype", [("float16", ""), ("bfloat16", ""),
                                                   ("float8_e4m3fn", "bfloat16"), ("float8_e5m2", "float16")])
def test_cuda_pool_attention_matches_cpu_reference(dtype, compute_dtype):
    # A GPU memserver's pool, filled through the StoreBlocks path (views and staged copies); fp8:
    # the workers' --kv-cache-dtype, attended in the model's dtype.
    geo = Geometry(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, compute_dtype=compute_dtype)
    pool = BlockPool(geo, num_blocks=40, device="cuda")
    pool.allocate("other", 3)
    ids = pool.allocate("w", 12)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(12, *geo.block_shape, generator=gen).to(getattr(torch, dtype))
    fill(pool, ids, data.cuda())
    q = torch.randn(5, 8, 64, generator=gen).to(getattr(torch, geo.q_dtype))
    tables = [ids[:5], ids[5:12]]
    out, lse = attend(pool, "w", 2, q.cuda(), tables, [80, 112], [1, 4], 0.125)
    cpu_kv = pool.kv.cpu().float()
    width = 7
    ref_out, ref_lse = paged_attention_partial_ref(
        q.float(), cpu_kv[2, 0], cpu_kv[2, 1],
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor([80, 112], dtype=torch.int32), torch.tensor([0, 1, 5], dtype=torch.int32), 0.125, causal=False)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.cpu().float(), ref_out, atol=2e-2, rtol=2e-2)
