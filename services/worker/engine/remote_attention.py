"""One step's remote partial attention: which query rows go to which memory server, and the
scatter of their (out, lse) back to every packed token, identity (0, -inf) elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.memserver.messages import attend_layout
from services.worker.engine.remote import AttentionCall, RemoteKV
from services.worker.engine.scheduler import ScheduledChunk


@dataclass(frozen=True, slots=True)
class _ServerPart:
    memserver_id: str
    rows: torch.Tensor  # [T_m] int64: packed query rows of the sequences with blocks there
    covers_all: bool  # rows are every packed row, in order: no scatter needed
    block_tables: torch.Tensor  # [S_m, width] int32, built once for every layer of the step
    seq_lens: torch.Tensor  # [3, S_m] int32: num_blocks, context_len, query_len


class StepRemoteAttention:
    """Implements model.attention.RemoteAttention for one forward pass."""

    def __init__(self, remote: RemoteKV, parts: list[_ServerPart], num_tokens: int):
        self.remote = remote
        self.parts = parts  # sorted by memserver id: the merge order never depends on timing
        self.num_tokens = num_tokens

    @classmethod
    def plan(cls, remote: RemoteKV, chunks: list[ScheduledChunk], query_start: list[int], block_size: int):
        by_server: dict[str, tuple[list[int], list[list[int]], list[int], list[int]]] = {}
        for i, chunk in enumerate(chunks):
            per_server: dict[str, list[int]] = {}
            for span in chunk.seq.remote_spans:
                per_server.setdefault(span.memserver_id, []).extend(span.block_ids)
            for memserver_id, block_ids in per_server.items():
                rows, tables, lens, qlens = by_server.setdefault(memserver_id, ([], [], [], []))
                rows.extend(range(query_start[i], query_start[i + 1]))
                tables.append(block_ids)
                lens.append(len(block_ids) * block_size)
                qlens.append(chunk.num_tokens)
        if not by_server:
            return None
        num_tokens = query_start[-1]
        parts = [
            _ServerPart(m, torch.tensor(r, dtype=torch.int64), r == list(range(num_tokens)), *attend_layout(t, l, q))
            for m, (r, t, l, q) in sorted(by_server.items())
        ]
        return cls(remote, parts, num_tokens)

    def submit(self, layer_idx: int, q: torch.Tensor) -> list:
        # index_select copies: the request reads its q after this returns, the caller's may change.
        return self.remote.submit_attention([
            (part.memserver_id,
             AttentionCall(layer_idx, q.index_select(0, part.rows.to(q.device)), part.block_tables, part.seq_lens))
            for part in self.parts
        ])

    def collect(self, handle: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        states = []
        for part, future in zip(self.parts, handle):
            out_m, lse_m = future.result()  # raises MemserverLost
            if part.covers_all:  # e.g. decode of sequences that all have blocks there
                states.append((out_m, lse_m.float()))
                continue
            rows = part.rows.to(out_m.device)
            out = out_m.new_zeros(self.num_tokens, *out_m.shape[1:])
            lse = torch.full((self.num_tokens, lse_m.shape[1]), float("-inf"), dtype=torch.float32, device=lse_m.device)
            out.index_copy_(0, rows, out_m)
            lse.index_copy_(0, rows, lse_m.float())
            states.append((out, lse))
        return states
