"""Continuous batching with chunked prefill, spilling, and preemption by recompute. Pure Python.

Every step, each scheduled sequence computes some of its not-yet-cached tokens: one for a decoding
sequence, a chunk of the prompt for a prefilling one, under a per-step token budget. Running
sequences go first (oldest first; with priority scheduling, the lowest priority number first);
waiting ones join while budget, sequence slots and blocks last.

When local blocks run short, the oldest full blocks of the longest sequences are spilled to memory
servers (if the cluster has room); the newest stay local, since decoding appends there. Only when
nothing can be spilled is the newest (or least urgent) running sequence preempted: its blocks are freed and it goes
back to the front of the queue, later recomputing its KV from its tokens (output unchanged).
A sequence joining the batch first takes the cached blocks of its longest cached prefix
(block_manager: prefix caching), local or, for its first blocks, on memory servers (remote_cache);
at least its last token is computed, since sampling needs it. Unused cached blocks on memory
servers are given up when a spill needs their room. A sequence whose spill the memory servers
refused waits out a backoff (Sequence.admit_after) before it joins again; those behind it may join
meanwhile.
I/O (moving and freeing remote blocks) is left to the engine: `schedule` returns what to do.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.prefix_hash import extend_block_hashes
from services.worker.engine.remote_holdings import RemoteHoldings
from services.worker.engine.sequence import Sequence, SeqStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.start + self.num_tokens >= self.seq.num_tokens

    @property
    def num_proposed(self) -> int:
        """How many of the sequence's proposed tokens (spec_token_ids) the chunk checks."""
        return max(0, self.start + self.num_tokens - self.seq.num_tokens)


@dataclass(frozen=True, slots=True)
class SpillPlan:
    """Local blocks to copy to memory servers before this step's forward pass reuses them."""

    seq: Sequence
    block_ids: list[int]  # token order; already free in the block manager
    start_token: int
    epoch: int  # seq.num_preemptions when planned: a plan of a since-preempted sequence is void

    @property
    def valid(self) -> bool:
        return self.seq.status is SeqStatus.RUNNING and self.seq.num_preemptions == self.epoch


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    spills: list[SpillPlan] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        remote_free_blocks: Callable[[], int] | None = None,
        spill_batch: int = 4,
        by_priority: bool = False,
        remote_reclaimable: Callable[[], int] | None = None,
        remote_take_reclaim: Callable[[], int] | None = None,
        remote_capacity: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.blocks = block_manager
        self.clock = clock  # what Sequence.admit_after is read against
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Our KV on memory servers, and the room there (RemoteKV.free_blocks, reclaimable_blocks,
        # take_reclaim, capacity_blocks); the engine frees what lands in self.remote.released
        self.remote = RemoteHoldings(block_manager.block_size, block_manager.enable_caching,
                                     remote_free_blocks, remote_reclaimable, remote_take_reclaim, remote_capacity)
        self.spill_batch = spill_batch  # spill at least this many blocks at once (fewer round trips)
        # --scheduling-policy priority: the queue is kept in Sequence.order (FCFS: arrival, a
        # preempted sequence first); running and preemption follow Sequence.order either way
        self.by_priority = by_priority
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self._out = SchedulerOutput()
        self._spilled_this_step = 0
        self._num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            bisect.insort(self.waiting, seq, key=lambda s: s.order)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def ready_in(self) -> float:
        """Seconds until a step has something to do (0: now): while only sequences backing off
        after a refused spill wait, until the first of them may be admitted."""
        if self.running or not self.waiting:
            return 0.0
        return max(0.0, min(s.admit_after for s in self.waiting) - self.clock())

    def schedule(self) -> SchedulerOutput:
        self._out = SchedulerOutput()
        self._spilled_this_step = 0
        self.remote.new_step()
        num_preemptions = self._num_preemptions
        budget = self.max_num_batched_tokens
        # A preemption victim (the newest running sequence) is never one already scheduled.
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            # A decoding sequence's proposed tokens are checked in the same pass as its last token.
            want = seq.num_uncomputed_tokens + (len(seq.spec_token_ids) if seq.num_uncomputed_tokens == 1 else 0)
            num = self._reserve(seq, min(want, budget), may_preempt=True)
            if num:
                self._out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
                budget -= num
        # No admission in a step that had to preempt: memory is short, the victim would thrash.
        # One backing off after a refused spill is passed over: those behind it may go meanwhile.
        now, skipped = self.clock(), 0
        while (len(self.waiting) > skipped and budget > 0 and len(self.running) < self.max_num_seqs
               and num_preemptions == self._num_preemptions):
            seq = self.waiting[skipped]
            if seq.admit_after > now:
                skipped += 1
                continue
            self._take_cached_prefix(seq)
            num = self._reserve(seq, min(seq.num_uncomputed_tokens, budget), may_preempt=False)
            if not num:
                self._release(seq)  # the cached blocks it took go back
                seq.num_computed_tokens = 0
                break
            if not seq.num_preemptions:  # its first admission (a recompute is not a cache hit)
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            del self.waiting[skipped]
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.order)
            self._out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        return self._out

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """A sequence about to join (holding no KV) starts from the cached blocks of its prefix. Not
        one whose prompt is scored (echo with logprobs, prompt_logprobs): every prompt position must be computed."""
        if not self.blocks.enable_caching or seq.sampling.scores_prompt:
            return
        bs = self.blocks.block_size
        num_blocks = (seq.num_tokens - 1) // bs  # the last token stays to compute
        if num_blocks < 1:
            return
        extend_block_hashes(seq.block_hashes, seq.token_ids, bs, num_blocks, seq.hash_root)
        hashes = seq.block_hashes[:num_blocks]
        # Remote blocks come first in a sequence: the cached prefix is either all local, or
        # remote blocks then local ones, whichever covers more (all local on a tie: no round trips).
        num_remote = self.remote.num_cached(hashes)
        if num_remote and num_remote + self.blocks.num_cached(hashes[num_remote:]) > self.blocks.num_cached(hashes):
            seq.remote_spans = self.remote.take_prefix(hashes[:num_remote])
            seq.num_remote_tokens = num_remote * bs
        else:
            num_remote = 0
        seq.block_ids = self.blocks.match(hashes[num_remote:])
        seq.num_registered_blocks = num_remote + len(seq.block_ids)
        seq.num_computed_tokens = seq.num_registered_blocks * bs

    def cache_computed(self, seq: Sequence) -> None:
        """Register seq's full blocks whose KV is now computed, for later prefixes to reuse."""
        bs = self.blocks.block_size
        num_full = seq.num_computed_tokens // bs
        if not self.blocks.enable_caching or num_full <= seq.num_registered_blocks:
            return
        extend_block_hashes(seq.block_hashes, seq.token_ids, bs, num_full, seq.hash_root)
        first_local = seq.num_remote_tokens // bs  # blocks before it live on memory servers
        for j in range(max(seq.num_registered_blocks, first_local), num_full):
            self.blocks.register(seq.block_ids[j - first_local], seq.block_hashes[j])
        seq.num_registered_blocks = num_full

    def _blocks_needed(self, seq: Sequence, num: int) -> int:
        local_tokens = seq.num_computed_tokens + num - seq.num_remote_tokens
        return self.blocks.blocks_for(local_tokens) - len(seq.block_ids)

    def _reserve(self, seq: Sequence, want: int, may_preempt: bool) -> int:
        """Find local blocks for `want` more tokens of seq: spill, shrink the chunk, or preempt.
        Returns the number of tokens granted (0: none; seq may have been preempted)."""
        while True:
            need = self._blocks_needed(seq, want)
            free = self.blocks.num_free_blocks
            if need <= free:
                seq.block_ids.extend(self.blocks.allocate(need))
                return want
            if self._spill(need - free, seq):
                continue
            local_computed = seq.num_computed_tokens - seq.num_remote_tokens
            fit = (len(seq.block_ids) + free) * self.blocks.block_size - local_computed
            if fit >= 1:
                want = min(want, fit)  # a smaller prefill chunk now, the rest in later steps
                continue
            if not may_preempt:
                return 0
            victim = max((s for s in self.running if s.status is SeqStatus.RUNNING), key=lambda s: s.order)
            self.preempt(victim)
            if victim is seq:
                return 0

    def _spill(self, need: int, joining: Sequence) -> int:
        """Plan moving the oldest computed full blocks of the longest sequences off the worker;
        returns how many local blocks that frees. A block another sequence also uses (a shared
        cached prefix) frees nothing when moved, so sequences whose oldest block is shared are
        spilled only when the others cannot free enough."""
        if not self.remote.usable:
            return 0
        goal = max(need, self.spill_batch)
        room = self.remote.free_blocks() - self._spilled_this_step + self.remote.num_evicted_for_spill
        if room < goal:  # running sequences come before cached prefixes nobody uses
            room += self.remote.evict_for_spill(goal - room)
        if room < goal:
            # Other workers' cached blocks are room too (admission counted them), but only a
            # refused borrow makes the ledger ask them to give it up: plan the spill, and let the
            # servers refuse it (the sequence waits, and finds the room on a later try). Planned
            # within the free room only, a sequence of ours stalled for good while another
            # worker's idle cache filled the servers.
            room += min(goal - room, self.remote.others_reclaimable())
        moved = freed = 0
        # A sequence joining the batch may spill too: its cached prefix may fill the local pool.
        candidates = self.running if joining in self.running else [*self.running, joining]
        order = [s for s in sorted(candidates, key=lambda s: -s.num_tokens)
                 if s.status is SeqStatus.RUNNING or s is joining]
        for through_shared in (False, True):
            for seq in order:
                if freed >= goal or moved >= room:
                    break
                n, frees = self._spill_span(seq, goal - freed, room - moved, through_shared)
                if frees:
                    self._spill_blocks(seq, n)
                    moved, freed = moved + n, freed + frees
        self._spilled_this_step += moved
        return freed

    def _spill_span(self, seq: Sequence, goal: int, room: int, through_shared: bool) -> tuple[int, int]:
        """(n, f): moving seq's oldest n local blocks frees f of them (stops once f reaches goal)."""
        full = (seq.num_computed_tokens - seq.num_remote_tokens) // self.blocks.block_size
        candidates = seq.block_ids[:min(full, room)]
        if not candidates or (not through_shared and self.blocks.num_users(candidates[0]) > 1):
            return 0, 0
        n = frees = 0
        for block_id in candidates:
            n += 1
            frees += self.blocks.num_users(block_id) == 1
            if frees >= goal:
                break
        return n, frees

    def _spill_blocks(self, seq: Sequence, n: int) -> None:
        ids, seq.block_ids = seq.block_ids[:n], seq.block_ids[n:]
        self._out.spills.append(SpillPlan(seq, ids, seq.num_remote_tokens, seq.num_preemptions))
        seq.num_remote_tokens += n * self.blocks.block_size
        self.blocks.free(ids)

    def reset_prefix_cache(self) -> tuple[int, int]:
        """Forget every cached block nobody uses (vLLM's reset_prefix_cache): returns how many,
        (local, remote). The remote ones are released by the engine."""
        return self.blocks.reset_cache(), self.remote.reset()

    @property
    def num_preemptions(self) -> int:
        """Sequences preempted (freed for recompute) since start."""
        return self._num_preemptions

    def preempt(self, seq: Sequence) -> None:
        self._num_preemptions += 1
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        if self.by_priority:
            bisect.insort(self.waiting, seq, key=lambda s: s.order)
        else:
            self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence (finished or aborted) from wherever it is."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_registered_blocks = 0
        self.remote.release(seq.remote_spans)
        seq.remote_spans = []
        seq.num_remote_tokens = 0

    def fits_ever(self, num_tokens: int, extra_blocks: int = 0) -> bool:
        """Could a sequence of this many tokens be held by the local pool plus the cluster (plus
        `extra_blocks` known to be coming free)?"""
        remote = self.remote.room()
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks + remote + extra_blocks

    def fits_capacity(self, num_tokens: int) -> bool:
        """Could the local pool plus every block of the lending memory servers hold a sequence of
        this many tokens, were nothing else using them?"""
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks + self.remote.capacity()
