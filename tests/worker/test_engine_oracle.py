"""Greedy tokens of the engine equal transformers' generate on the same weights, for prompts run
together under continuous batching, chunked prefill and preemption."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from services.worker.engine.api import FinishReason, GenerateRequest, InvalidRequest, SamplingParams
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from tests.worker.checkpoints import save_checkpoint

PROMPT_LENS = [1, 3, 17, 31, 64, 100, 5, 47]
MAX_TOKENS = 24


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in PROMPT_LENS]


def hf_greedy(model_dir, prompts, max_tokens=MAX_TOKENS) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
        outs.append(out[0, len(ids):].tolist())
    return outs


def run_engine(engine: LLMEngine, prompts, max_tokens=MAX_TOKENS) -> tuple[list[list[int]], int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.submit(engine.prepare(GenerateRequest(f"r{i}", params, prompt_token_ids=tuple(ids))))
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    preempted: set[str] = set()
    while engine.has_work():
        for seq in engine.scheduler.waiting:
            if seq.num_preemptions:
                preempted.add(seq.request_id)
        for delta in engine.step():
            outs[delta.request_id].extend(delta.token_ids)
            if delta.finish_reason is not None:
                assert delta.finish_reason is FinishReason.LENGTH
    return [outs[f"r{i}"] for i in range(len(prompts))], len(preempted)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    made = {
        "llama": save_checkpoint(root / "llama", "llama"),
        "qwen2": save_checkpoint(root / "qwen2", "qwen2"),
        "tied": save_checkpoint(root / "tied", "llama", tied=True),
        "llama3_rope": save_checkpoint(root / "llama3", "llama", rope_scaling=llama3),
        "mistral": save_checkpoint(root / "mistral", "mistral"),
    }
    prompts = _prompts(1024)
    return {name: (path, hf_greedy(path, prompts)) for name, path in made.items()}, prompts


@pytest.mark.parametrize("block_size,num_blocks,expect_preemption", [
    (1, None, False), (16, None, False), (32, None, False),
    (1, 160, True), (16, 14, True), (32, 8, True),
])
def test_llama_matches_transformers(checkpoints, block_size, num_blocks, expect_preemption):
    made, prompts = checkpoints
    path, expected = made["llama"]
    engine = LLMEngine(EngineConfig(model=str(path), block_size=block_size, num_kv_blocks=num_blocks or 4096,
                                    max_num_batched_tokens=64))
    got, num_preempted = run_engine(engine, prompts)
    assert got == expected
    assert (num_preempted > 0) == expect_preemption
    assert engine.stats().num_preemptions >= num_preempted  # what the router's metrics report
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("variant", ["qwen2", "tied", "llama3_rope", "mistral"])
def test_variants_match_transformers(checkpoints, variant):
    made, prompts = checkpoints
    path, expected = made[variant]
    engine = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=14, max_num_batched_tokens=48))
    got, num_preempted = run_engine(engine, prompts)
    assert got == expected
    assert num_preempted > 0
    assert engine.blocks.num_used_blocks == 0


def test_lm_head_on_more_threads_matches_transformers_and_the_rest_keeps_its_own(checkpoints):
    """The lm_head may take the host's spare core (logits_threads): same greedy tokens, and every
    other op of the step still runs on num_threads."""
    made, prompts = checkpoints
    path, expected = made["tied"]
    before = torch.get_num_threads()
    try:
        engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=4096, num_threads=1, logits_threads=2))
        model, seen = engine.runner.model, []
        compute_logits = model.compute_logits

        def recording(hidden):
            seen.append(torch.get_num_threads())
            return compute_logits(hidden)

        model.compute_logits = recording
        got, _ = run_engine(engine, prompts)
        assert got == expected
        assert seen and set(seen) == {2}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _OpenAIPenalties:
    """OpenAI's logit_bias, frequency and presence penalties as a transformers logits processor,
    written independently of the engine's: plain loops over the generated ids."""

    def __init__(self, prompt_len: int, frequency: float, presence: float, bias: dict[int, float]):
        self.prompt_len, self.frequency, self.presence, self.bias = prompt_len, frequency, presence, bias

    def __call__(self, input_ids, scores):
        for token, bias in self.bias.items():
            scores[0, token] += bias
        generated = input_ids[0, self.prompt_len:].tolist()
        for token in set(generated):
            scores[0, token] -= self.frequency * generated.count(token) + self.presence
        return scores


def test_penalties_and_logit_bias_match_transformers_under_continuous_batching(checkpoints):
    """Greedy with repetition_penalty (transformers' own processor) and with OpenAI's frequency and
    presence penalties plus a logit bias, mixed with plain greedy requests in one batch."""
    import transformers

    made, prompts = checkpoints
    path, plain_expected = made["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    cases = [
        ({}, {}),
        ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
        ({"frequency_penalty": 0.5, "presence_penalty": 0.25, "logit_bias": ((7, 1.5), (11, -2.0))},
         {"openai": (0.5, 0.25, {7: 1.5, 11: -2.0})}),
        ({"frequency_penalty": -0.5, "presence_penalty": 1.0}, {"openai": (-0.5, 1.0, {})}),
    ]
    expected, params = [], []
    for i, ids in enumerate(prompts):
        ours, theirs = cases[i % len(cases)]
        params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, **ours))
        kwargs = dict(max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
        if "repetition_penalty" in theirs:
            kwargs["repetition_penalty"] = theirs["repetition_penalty"]
        if "openai" in theirs:
            kwargs["logits_processor"] = transformers.LogitsProcessorList([_OpenAIPenalties(len(ids), *theirs["openai"])])
        out = model.generate(torch.tensor([ids]), **kwargs)
        expected.append(out[0, len(ids):].tolist())
    # The penalties change what greedy picks, so this test cannot pass with them ignored.
    assert all(expected[i] != plain_expected[i] for i in range(len(prompts)) if i % len(cases))

    engine = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=14, max_num_batched_tokens=48))
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.submit(engine.prepare(GenerateRequest(f"r{i}", p, prompt_token_ids=tuple(ids))))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for delta in engine.step():
            got[delta.request_id].extend(delta.token_ids)
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    assert engine.blocks.num_used_blocks == 0


def test_echo_scores_the_prompt_as_transformers_does(checkpoints):
    """echo with logprobs: the first delta starts with every prompt token (the first with no
    logprob) and the logprob transformers gives it after the tokens before it, under chunked
    prefill and preemption (a recomputed prompt is not scored twice)."""
    import transformers

    made, prompts = checkpoints
    path, _ = made["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=14, max_num_batched_tokens=48))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2, echo=True)
    score_only = SamplingParams(max_tokens=0, temperature=0, logprobs=2, echo=True)  # max_tokens 0: no generation
    for i, ids in enumerate(prompts):
        engine.submit(engine.prepare(GenerateRequest(f"r{i}", score_only if i % 3 == 2 else params,
                                                     prompt_token_ids=tuple(ids))))
    first: dict[str, object] = {}
    preempted = set()
    while engine.has_work():
        preempted |= {s.request_id for s in engine.scheduler.waiting if s.num_preemptions}
        for delta in engine.step():
            first.setdefault(delta.request_id, delta)
    assert preempted and engine.blocks.num_used_blocks == 0
    for i, ids in enumerate(prompts):
        delta = first[f"r{i}"]
        assert delta.text.startswith(engine.tokenizer.decode(ids))
        entries = delta.logprobs
        if i % 3 == 2:
            assert (delta.token_ids, delta.num_generated_tokens, delta.finish_reason) == ((), 0, FinishReason.LENGTH)
        assert len(entries) == len(ids) + (i % 3 != 2)  # the prompt, then the first generated token
        assert [e.token_id for e in entries[:len(ids)]] == ids and entries[0].logprob is None
        with torch.inference_mode():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        for pos, entry in enumerate(entries[1:len(ids)]):  # position pos predicts token pos + 1
            assert entry.logprob == pytest.approx(expected[pos, ids[pos + 1]].item(), abs=1e-4)
            assert [t for t, _, _ in entry.top] == torch.topk(expected[pos], 2).indices.tolist()


def _first_deltas(engine: LLMEngine, jobs: list[tuple[list[int], SamplingParams]]) -> tuple[list, list, set]:
    """Run every job together: (first delta, generated ids) per job, and the ids of those preempted."""
    start = len(engine._active) + next(engine._arrivals)
    ids = [f"p{start}-{i}" for i in range(len(jobs))]
    for rid, (prompt, params) in zip(ids, jobs):
        engine.submit(engine.prepare(GenerateRequest(rid, params, prompt_token_ids=tuple(prompt))))
    first, got, preempted = {}, {rid: [] for rid in ids}, set()
    while engine.has_work():
        preempted |= {s.request_id for s in engine.scheduler.waiting if s.num_preemptions}
        for delta in engine.step():
            first.setdefault(delta.request_id, delta)
            got[delta.request_id].extend(delta.token_ids)
    return [first[rid] for rid in ids], [got[rid] for rid in ids], preempted


def test_prompt_logprobs_and_ranks_match_transformers(checkpoints):
    """vLLM's prompt_logprobs: the first delta carries every prompt token with the logprob, rank and
    top-k alternatives transformers gives it after the tokens before it (the first token none),
    under chunked prefill and preemption, and for a prompt whose blocks are in the prefix cache
    (scoring computes every position). return_token_ids adds the prompt's ids."""
    import transformers

    made, prompts = checkpoints
    path, expected_tokens = made["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    k = 3
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=k,
                            return_token_ids=True)
    small = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=14, max_num_batched_tokens=48))
    deltas, got, preempted = _first_deltas(small, [(ids, params) for ids in prompts])
    assert preempted and got == expected_tokens and small.blocks.num_used_blocks == 0
    # A prompt whose first three blocks are cached: a plain request reuses them, a scored one not.
    big = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=4096))
    plain = dataclasses.replace(params, prompt_logprobs=None, return_token_ids=False)
    repeat = prompts[4]  # 64 tokens
    (cached,), _, _ = _first_deltas(big, [(repeat, plain)])
    (plain_again, scored), _, _ = _first_deltas(big, [(repeat, plain), (repeat, params)])
    assert (cached.num_cached_tokens, plain_again.num_cached_tokens, scored.num_cached_tokens) == (0, 48, 0)
    assert plain_again.prompt_logprobs is None and plain_again.prompt_token_ids is None
    for ids, delta in [*zip(prompts, deltas), (repeat, scored)]:
        assert delta.prompt_token_ids == tuple(ids) and delta.num_generated_tokens == 1
        entries = delta.prompt_logprobs
        assert [e.token_id for e in entries] == ids
        assert (entries[0].logprob, entries[0].rank, entries[0].top) == (None, None, ())
        with torch.inference_mode():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        for pos, entry in enumerate(entries[1:]):  # position pos predicts token pos + 1
            row, token = expected[pos], ids[pos + 1]
            assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert entry.rank == 1 + int((row > row[token]).sum())
            assert [t for t, _, _ in entry.top] == torch.topk(row, k).indices.tolist()
            assert [text for _, text, _ in entry.top] == [small.tokenizer.token_text(t) for t, _, _ in entry.top]
        assert delta.logprobs is None  # logprobs of the output were not asked for


def _cached_tokens(engine: LLMEngine, prompts, max_tokens=MAX_TOKENS) -> tuple[list[list[int]], list[int]]:
    """Like run_engine, also returning each request's prompt tokens found in the prefix cache."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = len(engine._active) + next(engine._arrivals)
    ids = [f"c{start}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.submit(engine.prepare(GenerateRequest(rid, params, prompt_token_ids=tuple(p))))
    outs, cached = {rid: [] for rid in ids}, {}
    while engine.has_work():
        for delta in engine.step():
            outs[delta.request_id].extend(delta.token_ids)
            cached.setdefault(delta.request_id, delta.num_cached_tokens)
    return [outs[rid] for rid in ids], [cached[rid] for rid in ids]


@pytest.mark.parametrize("block_size,num_blocks", [(1, 4096), (16, 4096), (32, 4096), (16, 14)])
def test_prompts_sharing_a_prefix_reuse_its_kv_and_match_transformers(checkpoints, block_size, num_blocks):
    """Prefix caching: a second turn (the first prompt, its answer and more) and prompts that share
    the first prompt's start take its blocks' KV instead of recomputing it, and still produce
    transformers' tokens; with a pool too small for all of them, under preemption too."""
    made, _ = checkpoints
    path, _ = made["llama"]
    rng = random.Random(7)
    first = [rng.randrange(1, 1024) for _ in range(70)]
    engine = LLMEngine(EngineConfig(model=str(path), block_size=block_size, num_kv_blocks=num_blocks,
                                    max_num_batched_tokens=64))
    (answer,), (cached_first,) = _cached_tokens(engine, [first])
    assert answer == hf_greedy(path, [first])[0] and cached_first == 0
    later = [
        first + answer + [rng.randrange(1, 1024) for _ in range(9)],  # the next turn of a chat
        first[:40] + [rng.randrange(1, 1024) for _ in range(30)],
        first[:33] + [rng.randrange(1, 1024) for _ in range(3)],
        list(first),  # the same prompt again
        [rng.randrange(1, 1024) for _ in range(50)],  # nothing in common
    ]
    got, cached = _cached_tokens(engine, later)
    assert got == hf_greedy(path, later)
    # What the first request left: its prompt and the answer tokens whose KV it computed.
    history = first + answer[:-1]
    for prompt, n in zip(later, cached):
        common = next((i for i, (a, b) in enumerate(zip(prompt, history)) if a != b), min(len(prompt), len(history)))
        reusable = min(common, len(prompt) - 1) // block_size * block_size
        if num_blocks == 4096:  # nothing evicted
            assert n == reusable
        else:
            assert n <= reusable
    assert cached[0] > len(first) // 2 and cached[-1] == 0
    assert engine.blocks.num_used_blocks == 0


def test_cache_salt_keeps_prefix_cache_blocks_to_requests_of_the_same_salt(checkpoints):
    """vLLM's cache_salt: a prompt cached under one salt (or none) is not found under another, only
    under the same; the tokens are transformers' every time."""
    made, prompts = checkpoints
    path, expected = made["llama"]
    engine = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=4096))
    prompt = prompts[4]  # 64 tokens: 48 reusable

    def run(salt):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, cache_salt=salt)
        (delta,), (tokens,), _ = _first_deltas(engine, [(prompt, params)])
        assert tokens == expected[4]
        return delta.num_cached_tokens

    assert [run(None), run("tenant-a"), run("tenant-a"), run(None), run("tenant-b")] == [0, 0, 48, 48, 0]
    with pytest.raises(InvalidRequest, match="cache_salt"):
        engine.prepare(GenerateRequest("bad", SamplingParams(cache_salt=""), prompt_token_ids=(1, 2)))


def test_priority_scheduling_changes_the_order_not_the_tokens(checkpoints):
    """--scheduling-policy priority under preemption (the order is the scheduler tests'): each request
    still gets transformers' tokens. A fcfs engine refuses a priority."""
    made, prompts = checkpoints
    path, expected = made["llama"]
    engine = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=14, max_num_batched_tokens=48,
                                    scheduling_policy="priority"))
    jobs = [(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, priority=len(prompts) - i))
            for i, ids in enumerate(prompts)]
    deltas, got, preempted = _first_deltas(engine, jobs)
    assert got == expected and preempted
    fcfs = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=64))
    with pytest.raises(InvalidRequest, match="--scheduling-policy priority"):
        fcfs.prepare(GenerateRequest("p", SamplingParams(priority=1), prompt_token_ids=(1, 2)))


def test_prefix_caching_off_computes_every_prompt_token(checkpoints):
    made, prompts = checkpoints
    path, expected = made["llama"]
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=4096, enable_prefix_caching=False))
    got, cached = _cached_tokens(engine, prompts)
    again, cached_again = _cached_tokens(engine, prompts)
    assert got == again == expected
    assert cached == cached_again == [0] * len(prompts) and engine.blocks.num_cached_blocks == 0
