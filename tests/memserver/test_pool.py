import pytest
import torch

from kernels.reference import paged_attention_partial_ref
from services.memserver.pool import BlockPool, Geometry, NotOwner, OwnerCapExceeded, PoolFull

GEO = Geometry(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")


def test_allocate_free_and_owner_isolation():
    pool = BlockPool(GEO, num_blocks=6, per_owner_cap=4)
    a = pool.allocate("w1", 3)
    b = pool.allocate("w2", 2)
    assert set(a).isdisjoint(b) and pool.num_free == 1
    assert pool.holdings() == {"w1": 3, "w2": 2}
    with pytest.raises(NotOwner, match=f"block {b[0]} is not held by w1"):
        pool.free("w1", [b[0]])
    with pytest.raises(NotOwner):
        pool.attention("w1", 0, torch.zeros(1, 4, 8), [[b[0]]], [4], [1], 1.0)
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
    out, lse = pool.attention("w", 1, q, tables, [8, 12], [1, 2], 0.3)
    ref_out, ref_lse = paged_attention_partial_ref(
        q, pool.kv[:, 1, 0], pool.kv[:, 1, 1], torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor([8, 12], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32), 0.3, causal=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
