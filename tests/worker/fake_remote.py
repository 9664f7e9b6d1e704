"""An in-process RemoteKV for engine unit tests only (the real one talks UCX to memservers)."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from kernels import paged_attention_partial
from services.worker.engine.remote import AttentionCall, MemserverLost, RemoteSpan, SpillFailed


class FakeMemserver:
    def __init__(self, num_blocks: int, block_shape: tuple[int, ...], dtype):
        num_layers, _, *frame = block_shape  # block_shape: (L, 2, bs, Hkv, D)
        self.pool = torch.zeros(num_layers, 2, num_blocks, *frame, dtype=dtype)  # [L, 2, N, bs, Hkv, D]
        self.free_ids = list(range(num_blocks))
        self.alive = True
        self.peak_used = 0


class FakeRemoteKV:
    def __init__(self, num_servers: int, blocks_per_server: int, block_shape, dtype, scale: float):
        self.servers = {f"ms{i}": FakeMemserver(blocks_per_server, block_shape, dtype) for i in range(num_servers)}
        self.scale = scale
        self._lost: set[str] = set()
        self.num_spills = 0
        self.num_attention_calls = 0

    def free_blocks(self) -> int:
        return sum(len(s.free_ids) for s in self.servers.values() if s.alive)

    def reclaimable_blocks(self) -> int:
        return 0  # no other worker

    def capacity_blocks(self) -> int:
        return sum(s.pool.shape[2] for s in self.servers.values() if s.alive)

    def take_reclaim(self) -> int:
        return 0

    def used_blocks(self) -> int:
        return sum(s.pool.shape[2] - len(s.free_ids) for s in self.servers.values() if s.alive)

    def spill(self, request_id: str, kv: torch.Tensor, start_token: int, near: tuple[str, ...] = (),
              need: int = 0) -> list[RemoteSpan]:
        num_blocks = kv.shape[2]  # kv: [L, 2, n, bs, Hkv, D]
        if num_blocks > self.free_blocks():
            raise SpillFailed("cluster full")
        spans, done = [], 0
        # The sequence's servers first, then the most free: a sequence spreads over few servers.
        for name, server in sorted(self.servers.items(), key=lambda kv_: (kv_[0] not in near, -len(kv_[1].free_ids))):
            if done == num_blocks or not server.alive:
                continue
            n = min(len(server.free_ids), num_blocks - done)
            ids, server.free_ids = server.free_ids[:n], server.free_ids[n:]
            server.peak_used = max(server.peak_used, server.pool.shape[2] - len(server.free_ids))
            server.pool[:, :, ids] = kv[:, :, done : done + n]
            spans.append(RemoteSpan(name, tuple(ids), start_token + done * kv.shape[3]))
            done += n
        self.num_spills += 1
        return spans

    def release(self, spans: list[RemoteSpan]) -> Future:
        for span in spans:
            server = self.servers[span.memserver_id]
            if server.alive:
                if set(span.block_ids) & set(server.free_ids):
                    raise AssertionError(f"{span.memserver_id}: blocks freed twice: {span.block_ids}")
                server.free_ids.extend(span.block_ids)
        done: Future = Future()
        done.set_result(None)
        return done

    def submit_attention(self, calls: list[tuple[str, AttentionCall]]) -> list[Future]:
        return [self._attend(memserver_id, call) for memserver_id, call in calls]

    def _attend(self, memserver_id: str, call: AttentionCall) -> Future:
        future: Future = Future()
        server = self.servers[memserver_id]
        self.num_attention_calls += 1
        if not server.alive:
            future.set_exception(MemserverLost(memserver_id, "killed"))
            return future
        _, context_lens, query_lens = call.seq_lens.tolist()
        qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
        k = server.pool[call.layer, 0]
        v = server.pool[call.layer, 1]
        out, lse = paged_attention_partial(call.q, k, v, call.block_tables, torch.tensor(context_lens, dtype=torch.int32),
                                           qsl, self.scale, causal=False)
        future.set_result((out, lse))
        return future

    def kill(self, memserver_id: str) -> None:
        self.servers[memserver_id].alive = False
        self._lost.add(memserver_id)

    def lost_memservers(self) -> set[str]:
        lost, self._lost = self._lost, set()
        return lost
