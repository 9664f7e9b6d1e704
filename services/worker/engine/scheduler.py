"""Continuous batching with chunked prefill and preemption by recompute. Pure Python.

Every step, each scheduled sequence computes some of its not-yet-cached tokens: one for a decoding
sequence, a chunk of the prompt for a prefilling one, under a per-step token budget. Running
sequences go first (oldest first); waiting ones join while budget, sequence slots and blocks last.
When blocks run out, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, later recomputing its KV from its tokens (output unchanged).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.sequence import Sequence, SeqStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        # self.running is kept in arrival order: a preemption victim (the newest) is never one
        # already scheduled in this step.
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            num = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve(seq, num):
                continue  # seq itself was preempted
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num = min(seq.num_uncomputed_tokens, budget)
            need = self.blocks.blocks_for(seq.num_computed_tokens + num) - len(seq.block_ids)
            if not self.blocks.can_allocate(need):
                break
            self.waiting.popleft()
            seq.block_ids.extend(self.blocks.allocate(need))
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        return chunks

    def _reserve(self, seq: Sequence, num: int) -> bool:
        """Make room for `num` more tokens of `seq`, preempting newer sequences if needed."""
        need = self.blocks.blocks_for(seq.num_computed_tokens + num) - len(seq.block_ids)
        while not self.blocks.can_allocate(need):
            victim = max(
                (s for s in self.running if s.status is SeqStatus.RUNNING), key=lambda s: s.arrival
            )
            self.preempt(victim)
            if victim is seq:
                return False
        seq.block_ids.extend(self.blocks.allocate(need))
        return True

    def preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence (finished or aborted) from wherever it is."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.status = SeqStatus.FINISHED

    def fits_ever(self, num_tokens: int) -> bool:
        """Could a sequence of this many tokens ever be held by the pool alone?"""
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks
