"""Spilling to memory servers (in-process fake here; real processes in tests/e2e): the tokens of a
context far beyond the worker's pool equal all-local and transformers, also after a server loss."""

from __future__ import annotations

import random

import pytest

from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from tests.worker.checkpoints import save_checkpoint
from tests.worker.fake_remote import FakeRemoteKV
from tests.worker.test_engine_oracle import MAX_TOKENS, hf_greedy, run_engine

LOCAL_BLOCKS = 8  # x 16 tokens = 128 tokens of local KV


def assert_no_block_leaked(engine: LLMEngine, remote: FakeRemoteKV) -> None:
    """Nothing in use anywhere; what the memory servers still hold is the engine's cache of
    spilled prefixes, and resetting the prefix cache frees it."""
    stats = engine.stats()
    assert engine.blocks.num_used_blocks == 0
    assert stats.num_remote_blocks == stats.num_remote_cached_blocks == remote.used_blocks()
    engine.reset_prefix_cache()
    assert remote.used_blocks() == 0 and engine.stats().num_remote_blocks == 0


def _engine(path, remote_servers: int, blocks_per_server: int = 64, remote_kv=FakeRemoteKV):
    config = EngineConfig(model=str(path), block_size=16, num_kv_blocks=LOCAL_BLOCKS, max_num_batched_tokens=64)
    probe = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=1))
    cfg = probe.model_config
    shape = (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    remote = remote_kv(remote_servers, blocks_per_server, shape, probe.runner.dtype, cfg.head_dim**-0.5)
    return LLMEngine(config, remote=remote), remote


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_checkpoint(tmp_path_factory.mktemp("spill") / "m", "llama")
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 1024) for _ in range(n)] for n in (1000, 300, 40, 700)]
    return path, prompts, hf_greedy(path, prompts)


def test_long_prompt_beyond_local_pool_matches_transformers(model):
    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=2)
    got, _ = run_engine(engine, prompts[:1])  # 1000 + 24 tokens: 8x the local pool
    assert got == expected[:1]
    assert remote.num_spills > 0 and remote.num_attention_calls > 0
    assert_no_block_leaked(engine, remote)


def test_concurrent_long_requests_spread_over_servers(model):
    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=2)
    got, _ = run_engine(engine, prompts)
    assert got == expected
    assert all(s.peak_used > 0 for s in remote.servers.values())  # both servers held blocks
    assert_no_block_leaked(engine, remote)


def test_memserver_loss_recomputes_with_identical_tokens(model):
    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=2, blocks_per_server=100)
    from services.worker.engine.api import GenerateRequest, SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.submit(engine.prepare(GenerateRequest(f"r{i}", params, prompt_token_ids=tuple(ids))))
    outs = {f"r{i}": [] for i in range(len(prompts))}
    killed = False
    while engine.has_work():
        for delta in engine.step():
            outs[delta.request_id].extend(delta.token_ids)
        if not killed and sum(map(len, outs.values())) >= 10 and remote.used_blocks() > 0:
            victim = max(remote.servers, key=lambda m: remote.servers[m].pool.shape[2] - len(remote.servers[m].free_ids))
            remote.kill(victim)
            killed = True
    assert killed
    assert [outs[f"r{i}"] for i in range(len(prompts))] == expected
    assert_no_block_leaked(engine, remote)


def test_admission_counts_cluster_capacity(model):
    path, prompts, _ = model
    from services.worker.engine.api import ContextLengthExceeded, GenerateRequest, SamplingParams

    engine, remote = _engine(path, remote_servers=1, blocks_per_server=20)  # 28 blocks = 448 tokens in all
    with pytest.raises(ContextLengthExceeded, match=r"holds 128 tokens here plus 320 free on memory servers \(of 320 there\)"):
        engine.prepare(GenerateRequest("big", SamplingParams(max_tokens=24), prompt_token_ids=tuple(prompts[0])))
    engine.prepare(GenerateRequest("ok", SamplingParams(max_tokens=24), prompt_token_ids=tuple(prompts[1])))


def test_a_request_the_cluster_holds_but_not_while_another_runs_is_busy_not_too_long(model):
    """The cluster's blocks are the limit of one sequence, not what other sequences leave free: a
    request that fits them is refused as busy (503, retry), not as too long (400), while another
    holds the room, and is served once that one ends."""
    path, prompts, expected = model
    from services.worker.engine.api import GenerateRequest, KVCapacityBusy, SamplingParams

    engine, remote = _engine(path, remote_servers=1, blocks_per_server=20)  # 28 blocks = 448 tokens in all
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine.submit(engine.prepare(GenerateRequest("first", params, prompt_token_ids=tuple(prompts[1]))))
    while remote.used_blocks() < 8:  # 324 tokens: 21 blocks, most of them spilled
        engine.step()
    second = GenerateRequest("second", params, prompt_token_ids=tuple(prompts[1]))
    with pytest.raises(KVCapacityBusy, match=r"needs 324 .* holds 128 tokens here plus 320 on memory servers"):
        engine.prepare(second)
    while engine.has_work():
        engine.step()
    got, _ = run_engine(engine, [prompts[1]])
    assert got == [expected[1]]
    assert_no_block_leaked(engine, remote)


def test_a_refused_spill_makes_a_sequence_wait_for_room_not_fail(model):
    """Two sequences the cluster holds one at a time, both admitted on a free-blocks hint that
    was stale (another worker's spill not yet heard of): the spill the servers refuse sends its
    sequence back to wait for the other to end. The cluster lost nothing, so nothing fails, and
    both streams' tokens equal transformers'."""
    from services.worker.engine.remote import SpillFailed

    path, prompts, expected = model

    class StaleHint(FakeRemoteKV):
        stale = 20  # blocks the hint still counts as free; a refused spill re-reads it (RemoteKVClient.refresh)

        def free_blocks(self) -> int:
            return super().free_blocks() + self.stale

        def spill(self, request_id, kv, start_token, near=(), need=0):
            if kv.shape[2] > super().free_blocks():
                self.stale = 0
                raise SpillFailed("memory servers refused the blocks")
            return super().spill(request_id, kv, start_token, near, need)

    engine, remote = _engine(path, remote_servers=1, blocks_per_server=20, remote_kv=StaleHint)  # 448 tokens in all
    second = prompts[1][::-1]
    got, _ = run_engine(engine, [prompts[1], second])  # 324 tokens each: 21 blocks
    assert got == [expected[1], hf_greedy(path, [second])[0]]
    assert remote.stale == 0  # a spill was refused
    assert_no_block_leaked(engine, remote)


def test_a_sequence_whose_spills_keep_being_refused_backs_off_instead_of_recomputing_at_once(model):
    """Each try of a sequence whose spill was refused recomputes the KV it had spilled: in a chaos
    run a 1,500-token request tried ~7 times a second while another held the room. Now it waits
    50 ms, then 100, 200 ... up to 1 s; those behind it may run meanwhile, and a loop that steps
    is told how long nothing can run (ready_in). Once room frees, its tokens equal transformers'."""
    from services.worker.engine.api import GenerateRequest, SamplingParams
    from services.worker.engine.remote import SpillFailed

    path, prompts, expected = model

    class Refusing(FakeRemoteKV):
        refusing = True  # another worker holds the room, as far as this one can tell

        def spill(self, request_id, kv, start_token, near=(), need=0):
            if self.refusing:
                self.num_refused = getattr(self, "num_refused", 0) + 1
                raise SpillFailed("the cluster has 0 free KV blocks on memory servers")
            return super().spill(request_id, kv, start_token, near, need)

    engine, remote = _engine(path, remote_servers=1, blocks_per_server=64, remote_kv=Refusing)
    now = [0.0]
    engine.scheduler.clock = lambda: now[0]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    engine.submit(engine.prepare(GenerateRequest("long", params, prompt_token_ids=tuple(prompts[1]))))  # 300 tokens
    engine.submit(engine.prepare(GenerateRequest("short", params, prompt_token_ids=tuple(prompts[2]))))  # 40
    tokens = {"long": [], "short": []}

    def steps(n):
        for _ in range(n):
            for d in engine.step():
                tokens[d.request_id] += d.token_ids

    steps(30)
    assert remote.num_refused == 1  # not once a step
    assert tokens["short"] == expected[2]  # it ran while the long one waited
    assert engine.has_work() and engine.ready_in() == pytest.approx(0.05)
    for refusals, backoff in ((2, 0.1), (3, 0.2), (4, 0.4), (5, 0.8), (6, 1.0), (7, 1.0)):
        now[0] += engine.ready_in()
        while remote.num_refused < refusals:
            steps(1)
        assert engine.ready_in() == pytest.approx(backoff)
    remote.refusing = False
    now[0] += engine.ready_in()
    while engine.has_work():
        steps(1)
    assert tokens["long"] == expected[1]
    assert_no_block_leaked(engine, remote)


def test_sequence_that_no_longer_fits_after_a_loss_ends_with_a_clear_error(model):
    from services.worker.engine.api import FinishReason, GenerateRequest, SamplingParams

    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=2, blocks_per_server=40)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine.submit(engine.prepare(GenerateRequest("long", params, prompt_token_ids=tuple(prompts[3]))))  # 700 tokens
    engine.submit(engine.prepare(GenerateRequest("short", params, prompt_token_ids=tuple(prompts[2]))))
    finals = {}
    killed = False
    while engine.has_work():
        for delta in engine.step():
            if delta.finish_reason is not None:
                finals[delta.request_id] = delta
        if not killed and remote.used_blocks() > 0:
            for name in list(remote.servers):  # the whole cluster's remote memory is gone
                remote.kill(name)
            killed = True
    assert finals["long"].finish_reason is FinishReason.ERROR
    assert "needs 724 tokens, 128 remain" in finals["long"].error
    assert finals["short"].finish_reason is FinishReason.LENGTH  # undisturbed
    assert_no_block_leaked(engine, remote)
