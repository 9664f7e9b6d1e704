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


def _h(i: int) -> bytes:
    return i.to_bytes(32, "little")


def test_a_freed_registered_block_stays_cached_until_evicted():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = bm.allocate(2)
    bm.register(a[0], _h(1))
    bm.register(a[1], _h(2))
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    assert bm.match([_h(1), _h(2), _h(3)]) == a  # the longest cached prefix
    assert bm.num_used_blocks == 2
    bm.free(a)
    # Never-registered blocks go first; then the least recently freed cached block, in token order.
    assert bm.allocate(1) not in ([a[0]], [a[1]])
    assert bm.allocate(1) == [a[0]]
    assert bm.match([_h(1)]) == [] and bm.match([_h(2)]) == [a[1]]  # its prefix's hash is gone


def test_match_shares_a_block_in_use_and_stops_at_the_first_miss():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(2)
    bm.register(a[0], _h(1))
    bm.register(a[1], _h(2))
    assert bm.match([_h(1), _h(9), _h(2)]) == [a[0]]
    bm.free(a)  # the first user leaves; the matcher still holds a[0]
    assert bm.num_used_blocks == 1
    bm.free([a[0]])
    assert bm.num_used_blocks == 0


def test_a_hash_keeps_its_first_block_and_caching_can_be_off():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = bm.allocate(1), bm.allocate(1)
    bm.register(a[0], _h(1))
    bm.register(b[0], _h(1))  # same tokens computed twice: the first copy is the cached one
    bm.free(b)
    assert bm.num_cached_blocks == 1 and bm.match([_h(1)]) == a
    off = BlockManager(num_blocks=2, block_size=4, enable_caching=False)
    c = off.allocate(1)
    off.register(c[0], _h(1))
    off.free(c)
    assert off.num_cached_blocks == 0 and off.match([_h(1)]) == []
