"""The memory server's request handlers, without a transport: what an Attend runs on."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from kernels.reference import paged_attention_partial_ref
from services.memserver.messages import Attend, StoreBlocks, attend_layout
from services.memserver.pool import BlockPool, Geometry
from services.memserver.service import NEXT_LAYER_LINGER_S, PARALLEL_MIN_KV_TOKENS, MemoryService, StaleEpoch

GEO = Geometry(num_layers=1, num_kv_heads=2, head_dim=8, block_size=16, dtype="float32")


@dataclass
class _Request:
    """What a handler reads of transport.server.Request; frames arrive whole."""

    message: Attend | StoreBlocks
    frames: list[torch.Tensor]
    peer: str = "peer-1"
    lingered: list[float] = field(default_factory=list)

    @property
    def frame_sizes(self) -> tuple[int, ...]:
        return tuple(f.numel() * f.element_size() for f in self.frames)

    async def recv_frames(self, into):
        for target, frame in zip(into, self.frames):
            target.copy_(frame)
        return into

    def linger(self, seconds: float) -> None:
        self.lingered.append(seconds)


async def test_small_decode_calls_run_on_one_thread_and_big_ones_on_all():
    num_blocks = PARALLEL_MIN_KV_TOKENS // GEO.block_size
    pool = BlockPool(GEO, num_blocks=num_blocks)
    service = MemoryService(pool, num_threads=2)
    ids = pool.allocate("w", num_blocks)
    torch.manual_seed(0)
    pool.kv.normal_()
    threads_seen = []
    attention = pool.attention

    def spy(*args):
        threads_seen.append(torch.get_num_threads())
        return attention(*args)

    pool.attention = spy
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for num_tokens in (PARALLEL_MIN_KV_TOKENS // 2, PARALLEL_MIN_KV_TOKENS):
            table = ids[: num_tokens // GEO.block_size]
            q = torch.randn(1, 4, GEO.head_dim)
            tables, seq_lens = attend_layout([table], [num_tokens], [1])
            msg = Attend("w", 0, 4, 0.35, "float32", 1, 1, tables.shape[1])
            reply = await service.attend(_Request(msg, [q, tables, seq_lens]))
            out, lse = reply.frames
            ref_out, ref_lse = paged_attention_partial_ref(q, pool.kv[0, 0], pool.kv[0, 1], tables,
                                                           torch.tensor([num_tokens], dtype=torch.int32),
                                                           torch.tensor([0, 1], dtype=torch.int32), 0.35, causal=False)
            torch.testing.assert_close(out, ref_out)
            torch.testing.assert_close(lse, ref_lse)
            assert torch.get_num_threads() == 2  # restored after a small call
    finally:
        torch.set_num_threads(before)
        service.close()
    assert threads_seen == [1, 2]


async def test_a_layer_but_the_last_keeps_polling_for_the_next_layers_query():
    geo = Geometry(num_layers=3, num_kv_heads=2, head_dim=8, block_size=16, dtype="float32")
    pool = BlockPool(geo, num_blocks=4)
    service = MemoryService(pool, num_threads=1)
    ids = pool.allocate("w", 2)
    tables, seq_lens = attend_layout([ids], [20], [1])
    lingered = []
    try:
        for layer in range(geo.num_layers):
            request = _Request(Attend("w", layer, 4, 0.35, "float32", 1, 1, tables.shape[1]),
                               [torch.randn(1, 4, geo.head_dim), tables, seq_lens])
            await service.attend(request)
            lingered += request.lingered
    finally:
        service.close()
    # The last layer ends the burst: the next query comes after the worker's step, asleep in epoll.
    assert lingered == [NEXT_LAYER_LINGER_S, NEXT_LAYER_LINGER_S, 0]


async def _store(service: MemoryService, owner: str, num_blocks: int, epoch: int, peer: str = "peer-1"):
    frames = [torch.randn(num_blocks, *GEO.frame_shape) for _ in range(2 * GEO.num_layers)]
    reply = await service.store(_Request(StoreBlocks(owner, num_blocks, epoch), frames, peer))
    return reply.block_ids


def _attend(owner: str, block_ids, epoch: int, peer: str = "peer-1") -> _Request:
    tables, seq_lens = attend_layout([list(block_ids)], [len(block_ids) * GEO.block_size], [1])
    return _Request(Attend(owner, 0, 4, 0.35, "float32", 1, 1, tables.shape[1], epoch),
                    [torch.randn(1, 4, GEO.head_dim), tables, seq_lens], peer)


@pytest.mark.parametrize("how", ["lease expired", "connection closed"])
async def test_blocks_freed_unasked_fence_off_the_owners_epoch_until_it_writes_them_off(how):
    # A worker frozen past its lease (or cut off) is alive when it wakes, and still counts the
    # blocks it had here as its own. Served under its old epoch, a store handed it those very ids
    # again and its engine died of "stored twice" (chaos, freeze-worker); now it is told its epoch
    # is stale, and it moves to a newer one as for any memory server it wrote off.
    pool = BlockPool(GEO, num_blocks=8)
    service = MemoryService(pool)
    try:
        old = await _store(service, "alice", 3, epoch=5)
        await _store(service, "bob", 1, epoch=9, peer="peer-2")
        if how == "lease expired":
            service.reap({"bob"})
        else:
            service.session_closed("peer-1")
        assert pool.holdings() == {"bob": 1}
        with pytest.raises(StaleEpoch):
            await _store(service, "alice", 3, epoch=5)
        with pytest.raises(StaleEpoch):
            await service.attend(_attend("alice", old, epoch=5))
        assert pool.holdings() == {"bob": 1}  # nothing handed out under the stale epoch
        new = await _store(service, "alice", 3, epoch=6)  # the next epoch is accepted
        assert new == old  # the same ids: what the stale epoch's messages would have hit
        reply = await service.attend(_attend("alice", new, epoch=6))
        assert reply.frames[0].shape == (1, 4, GEO.head_dim)
        assert (await service.attend(_attend("bob", [max(new) + 1], epoch=9, peer="peer-2"))).frames
    finally:
        service.close()
