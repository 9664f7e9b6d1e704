"""Where spilled KV lives: the worker's view of memory servers, as the engine needs it.

The engine stays synchronous and pure of I/O details: it talks to a `RemoteKV` (the UCX client in
services/worker/remote_client.py, or an in-process fake in unit tests).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch


class SpillFailed(Exception):
    """No memory server took the blocks (cluster full, creditor refused, or unreachable)."""


class MemserverLost(Exception):
    """A memory server holding some of our blocks is gone; its sequences must be recomputed."""

    def __init__(self, memserver_id: str, reason: str = ""):
        super().__init__(f"memory server {memserver_id} lost: {reason}")
        self.memserver_id = memserver_id


@dataclass(frozen=True, slots=True)
class RemoteSpan:
    """Consecutive full blocks of one sequence on one memory server, in token order."""

    memserver_id: str
    block_ids: tuple[int, ...]
    start_token: int  # the span covers [start_token, start_token + len(block_ids) * block_size)
    epoch: int = 0  # our epoch on that server when stored (its free carries it)


@dataclass(frozen=True, slots=True)
class AttentionCall:
    """One layer's queries for one memory server: every sequence with blocks there. The layout
    tensors are built once per step and shared by its layers (services.memserver.messages.Attend)."""

    layer: int
    q: torch.Tensor  # [num_tokens, num_heads, head_dim], contiguous
    block_tables: torch.Tensor  # [num_seqs, width] int32: per sequence its block ids there, token order
    seq_lens: torch.Tensor  # [3, num_seqs] int32: rows num_blocks, context_len (tokens there), query_len


class RemoteKV(Protocol):
    def free_blocks(self) -> int:
        """Blocks the cluster could lend now (a hint: a spill may still be refused)."""

    def reclaimable_blocks(self) -> int:
        """Blocks other workers only cache there (a hint: they give them up when the ledger runs short)."""

    def capacity_blocks(self) -> int:
        """Every block the cluster's lending memory servers have, in use or not (a hint)."""

    def take_reclaim(self) -> int:
        """How many of our cached blocks other workers need (the ledger refused them); each
        heartbeat's figure is returned once, then 0."""

    def spill(self, request_id: str, kv: torch.Tensor, start_token: int, near: tuple[str, ...] = (),
              need: int = 0) -> list[RemoteSpan]:
        """Move blocks off the worker. kv: [num_layers, 2, n, block_size, num_kv_heads, head_dim]
        (a copy the call may keep). near: memservers already holding the sequence, preferred (one
        request per server per layer). need: blocks the sequence needs there in all, these included
        (what to ask of other workers' caches if refused). Blocking. Raises SpillFailed (nothing
        kept) on failure."""

    def release(self, spans: list[RemoteSpan]) -> Future:
        """Free blocks on their memory servers and repay the ledger (best effort, never raises).
        The future is done once both are (the engine waits on it before borrowing again)."""

    def submit_attention(self, calls: list[tuple[str, AttentionCall]]) -> list[Future]:
        """Start one layer's partial attention on each memory server named (one call each). One
        future each, or an object with the same blocking ``result()``: (out [T, H, D], lse [T, H]
        fp32), or MemserverLost raised. The caller collects them in the thread that submitted."""

    def lost_memservers(self) -> set[str]:
        """Memory servers found dead since the last call (each reported once)."""
