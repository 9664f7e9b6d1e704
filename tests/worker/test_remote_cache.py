"""The worker's count of its blocks on memory servers, and its cache of spilled prefixes: pure Python."""

from __future__ import annotations

import pytest

from services.worker.engine.remote import RemoteSpan
from services.worker.engine.remote_cache import RemoteBlock, RemoteBlockCache, blocks_of, spans_of


def _blocks(memserver_id: str, *ids: int, epoch: int = 0) -> list[RemoteBlock]:
    return [RemoteBlock(memserver_id, i, epoch) for i in ids]


def test_an_uncached_block_is_freed_by_its_last_user():
    cache = RemoteBlockCache()
    a = _blocks("m0", 1, 2)
    cache.add(a)
    assert cache.free(a) == a and cache.num_blocks == 0
    with pytest.raises(RuntimeError, match="freed twice"):
        cache.free(a[:1])


def test_a_cached_block_outlives_its_users_until_evicted_least_recent_first():
    cache = RemoteBlockCache()
    doc, other = _blocks("m0", 1, 2, 3), _blocks("m1", 7)
    cache.add(doc + other)
    for block, h in zip(doc + other, (b"h1", b"h2", b"h3", b"x")):
        cache.register(block, h)
    assert cache.free(doc) == [] and cache.free(other) == []
    assert (cache.num_blocks, cache.num_evictable) == (4, 4)
    assert cache.held_per_memserver() == {"m0": 3, "m1": 1}
    assert cache.num_cached([b"h1", b"h2", b"zz", b"h3"]) == 2  # a prefix only, taking nothing
    taken = cache.match([b"h1", b"h2"])
    assert taken == doc[:2] and cache.num_evictable == 2
    assert cache.evict(10) == [doc[2], other[0]]  # unused ones only, freed longest ago first
    assert cache.match([b"h1", b"h2", b"h3"]) == doc[:2]  # a second user of each
    assert cache.free(doc[:2]) == [] and cache.free(doc[:2]) == []
    assert cache.evict(1) == doc[1:2] and cache.num_cached([b"h1", b"h2"]) == 1  # its tail goes first


def test_a_hash_keeps_its_first_block_and_caching_off_registers_nothing():
    cache = RemoteBlockCache()
    first, second = _blocks("m0", 1, 2)
    cache.add([first, second])
    cache.register(first, b"h")
    cache.register(second, b"h")  # the same tokens spilled twice: the copy is freed with its user
    assert cache.free([second]) == [second] and cache.match([b"h"]) == [first]
    off = RemoteBlockCache(enable_caching=False)
    off.add([first])
    off.register(first, b"h")
    assert off.free([first]) == [first] and off.match([b"h"]) == []


def test_a_lost_memserver_is_forgotten_and_its_used_blocks_freed_by_their_users():
    cache = RemoteBlockCache()
    gone_unused, gone_used, kept = _blocks("m0", 1), _blocks("m0", 2), _blocks("m1", 3)
    cache.add(gone_unused + gone_used + kept)
    for block, h in zip(gone_unused + gone_used + kept, (b"a", b"b", b"c")):
        cache.register(block, h)
    cache.free(gone_unused + kept)
    assert cache.forget({"m0"}) == gone_unused
    assert cache.num_cached([b"a"]) == cache.num_cached([b"b"]) == 0 and cache.num_cached([b"c"]) == 1
    assert cache.free(gone_used) == gone_used  # no longer cached: its last user frees it
    assert cache.num_blocks == 1


def test_spans_and_blocks_convert_both_ways_in_token_order():
    spans = [RemoteSpan("m0", (4, 5), 0, 1), RemoteSpan("m1", (9,), 32, 2), RemoteSpan("m0", (6,), 48, 1)]
    blocks = blocks_of(spans)
    assert blocks == [RemoteBlock("m0", 4, 1), RemoteBlock("m0", 5, 1), RemoteBlock("m1", 9, 2),
                      RemoteBlock("m0", 6, 1)]
    assert spans_of(blocks, 0, 16) == spans
    assert spans_of(_blocks("m0", 1, epoch=1) + _blocks("m0", 2, epoch=2), 0, 16) == [
        RemoteSpan("m0", (1,), 0, 1), RemoteSpan("m0", (2,), 16, 2)]
