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


def test_max_num_seqs_caps_the_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(_seq(i, 2))
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["r0", "r1"]
    assert len(sched.waiting) == 1
