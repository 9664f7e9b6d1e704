import pytest

from services.worker.engine.block_manager import BlockManager


def test_allocate_free_roundtrip():
    bm = BlockManager(num_blocks=4, block_size=16)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(1) == 1 and bm.blocks_for(16) == 1 and bm.blocks_for(17) == 2
    assert bm.can_allocate(4) and not bm.can_allocate(5)
    ids = bm.allocate(3)
    assert len(set(ids)) == 3 and bm.num_free_blocks == 1 and bm.num_used_blocks == 3
    bm.free(ids)
    assert bm.num_free_blocks == 4


def test_refcounted_share_frees_on_last_reference():
    bm = BlockManager(num_blocks=2, block_size=16)
    ids = bm.allocate(1)
    bm.share(ids)
    bm.free(ids)
    assert bm.num_used_blocks == 1
    bm.free(ids)
    assert bm.num_used_blocks == 0


def test_misuse_raises():
    bm = BlockManager(num_blocks=1, block_size=16)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks, 1 free"):
        bm.allocate(2)
    ids = bm.allocate(1)
    bm.free(ids)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(ids)
