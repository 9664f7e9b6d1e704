import pytest

from services.worker.engine.api import SamplingParams
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import Sequence, SeqStatus


def _seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(f"r{i}", list(range(prompt_len)), SamplingParams(max_tokens=8), arrival=i)


def _complete(chunks, token=7):
    for c in chunks:
        c.seq.num_computed_tokens = c.start + c.num_tokens
        if c.samples:
            c.seq.output_token_ids.append(token)


def test_chunked_prefill_respects_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = _seq(0, 25), _seq(1, 3)
    sched.add(a)
    sched.add(b)
    chunks = sched.schedule().chunks
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("r0", 0, 10)]
    _complete(chunks)
    chunks = sched.schedule().chunks
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("r0", 10, 10)]
    _complete(chunks)
    chunks = sched.schedule().chunks  # r0's last 5 prompt tokens, then r1 joins the same step
    assert [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in chunks] == [
        ("r0", 20, 5, True), ("r1", 0, 3, True)]
    _complete(chunks)
    chunks = sched.schedule().chunks  # both decode
    assert [(c.seq.request_id, c.num_tokens) for c in chunks] == [("r0", 1), ("r1", 1)]


def test_preempts_newest_and_recomputes():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq(0, 8), _seq(1, 8)
    sched.add(a)
    sched.add(b)
    _complete(sched.schedule().chunks)  # both prefilled: 2 + 2 blocks, pool full, each holds 9 tokens now
    assert bm.num_free_blocks == 0
    chunks = sched.schedule().chunks  # a needs a third block: b (newest) is preempted
    assert [c.seq.request_id for c in chunks] == ["r0"]
    assert b.status is SeqStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert sched.waiting[0] is b and b.num_preemptions == 1
    sched.finish(a)
    chunks = sched.schedule().chunks  # b recomputes prompt + its generated token
    assert [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in chunks] == [("r1", 0, 9, True)]
    sched.finish(b)
    assert bm.num_used_blocks == 0


def _urgent(i: int, prompt_len: int, priority: int) -> Sequence:
    return Sequence(f"r{i}", list(range(prompt_len)), SamplingParams(max_tokens=8, priority=priority), arrival=i)


def test_priority_scheduling_serves_and_keeps_the_most_urgent_first():
    """--scheduling-policy priority (vLLM's): the queue is in (priority, arrival) order, and when
    blocks run out the least urgent running sequence is preempted, not the newest."""
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, by_priority=True)
    for i, priority in enumerate((5, 0, 1, 0)):
        sched.add(_urgent(i, 2, priority))
    admitted = []
    while sched.has_work():
        (chunk,) = sched.schedule().chunks
        admitted.append(chunk.seq.request_id)
        sched.finish(chunk.seq)
    assert admitted == ["r1", "r3", "r2", "r0"]

    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, by_priority=True)
    urgent, lax = _urgent(1, 8, -1), _urgent(0, 8, 3)  # the older one is the less urgent
    sched.add(lax)
    sched.add(urgent)
    _complete(sched.schedule().chunks)  # both prefilled: the pool is full
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["r1"]
    assert lax.status is SeqStatus.WAITING and lax.num_preemptions == 1  # FCFS would have preempted r1
    sched.finish(urgent)
    sched.finish(lax)
    assert bm.num_used_blocks == 0


def test_max_num_seqs_caps_the_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(_seq(i, 2))
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["r0", "r1"]
    assert len(sched.waiting) == 1


def test_a_sequence_backing_off_is_passed_over_and_those_behind_it_join():
    now = [10.0]
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100, clock=lambda: now[0])
    a, b, c = _seq(0, 6), _seq(1, 3), _seq(2, 3)
    a.admit_after, c.admit_after = 10.5, 10.2  # their spills were refused
    for seq in (a, b, c):
        sched.add(seq)
    assert [ch.seq.request_id for ch in sched.schedule().chunks] == ["r1"]
    assert [s.request_id for s in sched.waiting] == ["r0", "r2"]  # the queue keeps its order
    assert sched.ready_in() == 0  # r1 runs
    sched.finish(b)
    assert sched.ready_in() == pytest.approx(0.2)  # nothing may run before r2's backoff ends
    now[0] = 10.5
    assert [ch.seq.request_id for ch in sched.schedule().chunks] == ["r0", "r2"]


def _finish_prefill(sched, seq, token=7):
    """Run seq's prompt to its first token, registering its blocks as the engine does."""
    while not seq.output_token_ids:
        chunks = sched.schedule().chunks
        _complete(chunks, token)
        for c in chunks:
            sched.cache_computed(c.seq)


def test_a_joining_sequence_starts_from_its_cached_prefix():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    first = _seq(0, 10)  # tokens 0..9: blocks [0-3] [4-7] full, [8, 9] not
    sched.add(first)
    _finish_prefill(sched, first)
    sched.finish(first)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    same_start = Sequence("r1", list(range(6)) + [99] * 6, SamplingParams(max_tokens=8), arrival=1)
    sched.add(same_start)
    chunks = sched.schedule().chunks
    assert [(c.start, c.num_tokens) for c in chunks] == [(4, 8)]  # block [0-3] reused
    assert same_start.num_cached_tokens == 4
    sched.finish(same_start)
    # The whole prompt cached (two full blocks): its last block is computed again, for its logits.
    whole = _seq(2, 8)
    sched.add(whole)
    chunks = sched.schedule().chunks
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("r2", 4, 4)]


def test_a_sequence_that_cannot_join_gives_its_cached_blocks_back():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    first = _seq(0, 9)
    sched.add(first)
    _finish_prefill(sched, first)  # all 3 blocks, the 2 full ones registered
    late = _seq(2, 12)  # shares first's 2 full blocks, needs a third: none is free
    sched.add(late)
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["r0"]
    assert late.block_ids == [] and late.num_computed_tokens == 0 and late.num_cached_tokens == 0
    sched.finish(first)
    chunks = sched.schedule().chunks
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("r2", 8, 4)]
    assert late.num_cached_tokens == 8
    sched.finish(late)
    assert bm.num_used_blocks == 0


def test_a_scored_prompt_is_computed_whole():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    first = _seq(0, 10)
    sched.add(first)
    _finish_prefill(sched, first)
    echo = Sequence("r1", list(range(10)), SamplingParams(max_tokens=8, echo=True, logprobs=0), arrival=1)
    sched.add(echo)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in sched.schedule().chunks] == [("r0", 10, 1), ("r1", 0, 10)]


def _sharing_pair(num_blocks: int, extra: Sequence | None = None):
    """r0 (16 tokens, its 4 blocks cached) and r1, whose prompt starts with the same 16 tokens and
    shares those blocks; optionally a third sequence. Each has decoded one token."""
    bm = BlockManager(num_blocks, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, remote_free_blocks=lambda: 100, spill_batch=1)
    a = _seq(0, 16)
    sched.add(a)
    _finish_prefill(sched, a)
    b = Sequence("r1", list(range(16)) + [50, 51, 52, 53], SamplingParams(max_tokens=8), arrival=1)
    for seq in (b, extra) if extra is not None else (b,):
        sched.add(seq)
    chunks = sched.schedule().chunks
    _complete(chunks)
    for c in chunks:
        sched.cache_computed(c.seq)
    assert b.block_ids[:4] == a.block_ids[:4] and bm.num_free_blocks == 0
    return sched, a, b


def test_spilling_prefers_blocks_whose_move_frees_memory():
    """Moving a block another sequence shares frees nothing here: the scheduler spills a sequence
    whose oldest block is its own, and goes through shared blocks only when nothing else frees."""
    c = Sequence("r2", list(range(100, 116)), SamplingParams(max_tokens=8), arrival=2)
    sched, a, b = _sharing_pair(10, c)
    out = sched.schedule()  # r1 and r2 need a block each: r2's oldest ones move, not r1's shared prefix
    assert [(p.seq.request_id, len(p.block_ids)) for p in out.spills] == [("r2", 1), ("r2", 1)]
    assert len(b.block_ids) == 6 and b.num_remote_tokens == 0 and len(out.chunks) == 3
    sched, a, b = _sharing_pair(6)
    out = sched.schedule()  # only r0 and r1, both starting with the shared blocks
    assert [(p.seq.request_id, len(p.block_ids)) for p in out.spills] == [("r1", 5)]
    assert b.num_remote_tokens == 20 and a.num_remote_tokens == 0


def _cache_remote(sched: Scheduler, seq: Sequence, num_blocks: int) -> None:
    """As if seq's first num_blocks blocks had been spilled to m0 and seq had then finished."""
    from services.worker.engine.prefix_hash import extend_block_hashes
    from services.worker.engine.remote import RemoteSpan

    bs = sched.blocks.block_size
    extend_block_hashes(seq.block_hashes, seq.token_ids, bs, num_blocks, seq.hash_root)
    spans = [RemoteSpan("m0", tuple(range(100, 100 + num_blocks)), 0)]
    seq.remote_spans.extend(spans)
    sched.remote.stored(spans, seq.block_hashes)
    seq.num_remote_tokens = num_blocks * bs
    sched.finish(seq)


def test_a_cached_prefix_is_remote_then_local_blocks_only_when_that_covers_more():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, remote_free_blocks=lambda: 0)
    local = _seq(1, 17)
    sched.add(local)
    _complete(sched.schedule().chunks)
    sched.cache_computed(local)
    sched.finish(local)  # tokens 0..15 cached here
    _cache_remote(sched, _seq(0, 17), 2)  # and 0..7 on a memory server: all local covers more
    again = _seq(2, 17)
    sched.add(again)
    (chunk,) = sched.schedule().chunks
    assert (again.num_remote_tokens, chunk.start, again.remote_spans) == (0, 16, [])
    sched.finish(again)
    assert sched.reset_prefix_cache() == (4, 2)
    assert [(s.memserver_id, s.block_ids) for s in sched.remote.released] == [("m0", (101, 100))]  # tail first

    _cache_remote(sched, _seq(3, 17), 4)  # tokens 0..15 there, nothing here: remote it is
    remote = _seq(4, 17)
    sched.add(remote)
    (chunk,) = sched.schedule().chunks
    assert (remote.num_remote_tokens, chunk.start, remote.num_computed_tokens) == (16, 16, 16)
    assert [s.block_ids for s in remote.remote_spans] == [(100, 101, 102, 103)]
    sched.finish(remote)
    assert sched.fits_ever(16 * 4 + 4 * 4) and not sched.fits_ever(16 * 4 + 4 * 4 + 1)  # cached counts as free


def test_cached_remote_blocks_go_when_other_workers_need_their_room_and_count_as_room():
    asks = [3]
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100, remote_free_blocks=lambda: 2,
                      remote_reclaimable=lambda: 5, remote_take_reclaim=lambda: asks.pop() if asks else 0)
    _cache_remote(sched, _seq(0, 33), 8)
    assert sched.remote.room() == 2 + 8 + 5  # free, ours cached, others' cached
    assert sched.fits_ever(4 * (16 + 15)) and not sched.fits_ever(4 * (16 + 15) + 1)
    sched.schedule()  # the ledger asked for 3, once
    assert sched.remote.cache.num_evictable == 5
    assert [s.block_ids for s in sched.remote.released] == [(107, 106, 105)]  # the prefix's tail first
    sched.schedule()
    assert sched.remote.cache.num_evictable == 5


def test_a_joining_sequence_whose_cached_prefix_fills_the_pool_spills_it_and_runs():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, remote_free_blocks=lambda: 100, spill_batch=1)
    first = _seq(0, 17)
    sched.add(first)
    _complete(sched.schedule().chunks)  # 17 + 1 tokens: needs 5 blocks, one spilled to make room
    sched.cache_computed(first)
    sched.finish(first)
    longer = Sequence("r1", list(range(16)) + [99] * 8, SamplingParams(max_tokens=8), arrival=1)
    sched.add(longer)
    out = sched.schedule()  # its cached blocks are the whole pool; before, it waited forever
    assert [(c.seq.request_id, c.start) for c in out.chunks] == [("r1", longer.num_computed_tokens)]
    assert [p.seq for p in out.spills] == [longer] and longer.num_remote_tokens > 0


def test_a_spill_into_room_only_other_workers_cache_holds_is_planned_so_the_ledger_can_ask_for_it():
    """Nothing free on the memory servers, but other workers cache 10 blocks there: a prefill that
    outgrows the local pool plans its spill anyway (the servers refuse it, and that refusal is what
    makes the ledger ask the others to give the room up) instead of stalling."""
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100, remote_free_blocks=lambda: 0,
                      remote_reclaimable=lambda: 10, spill_batch=2)
    seq = _seq(0, 24)  # 6 blocks, 4 here
    sched.add(seq)
    out = sched.schedule()
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 16)]  # what fits here
    _complete(out.chunks)
    out = sched.schedule()
    assert [len(p.block_ids) for p in out.spills] == [2]  # into room nobody has freed yet
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(16, 8)]
