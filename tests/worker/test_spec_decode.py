"""Speculative decoding with n-gram proposals: greedy tokens equal transformers' generate and the
engine without speculation, while steps yield several tokens."""

from __future__ import annotations

import random

import pytest

from services.worker.engine.api import FinishReason, GenerateRequest, SamplingParams
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.engine.spec_decode import NgramIndex, SpeculativeConfig
from tests.worker.checkpoints import save_checkpoint
from tests.worker.test_engine_oracle import hf_greedy

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'


def _brute_propose(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    for n in range(hi, lo - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        ends = [p for p in range(n, len(tokens)) if tokens[p - n:p] == suffix]
        if ends:
            pos, out = ends[-1], []
            for j in range(pos, pos + k):
                out.append(tokens[j] if j < len(tokens) else out[j - len(tokens)])
            return out
    return []


def test_ngram_index_proposes_what_a_scan_finds():
    rng = random.Random(0)
    for trial in range(200):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
        lo = rng.randrange(1, 4)
        hi = lo + rng.randrange(0, 3)
        index = NgramIndex(lo, hi)
        cut = rng.randrange(len(tokens) + 1)
        index.extend(tokens[:cut])
        index.extend(tokens[cut:])  # built in two parts, as the engine extends it
        assert index.propose(5) == _brute_propose(tokens, lo, hi, 5), (tokens, lo, hi)


def test_a_loop_is_proposed_past_the_end_of_the_context():
    index = NgramIndex(2, 2)
    index.extend([9, 1, 2, 3, 1, 2, 3, 1, 2])
    assert index.propose(7) == [3, 1, 2, 3, 1, 2, 3]


@pytest.mark.parametrize("text, expected", [
    ('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}', (5, 4, 4, None)),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 6}',
     (3, 2, 6, None)),
    ('{"method": "ngram", "num_speculative_tokens": 2}', (2, 5, 5, None)),
    ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 8}', (2, 5, 5, 8)),
])
def test_speculative_config_takes_vllms_json(text, expected):
    c = SpeculativeConfig.parse(text)
    assert (c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max, c.disable_by_batch_size) == expected


@pytest.mark.parametrize("text, message", [
    ("ngram", "is not JSON"),
    ('{"method": "eagle", "num_speculative_tokens": 3, "model": "x"}', "method 'eagle' is not supported"),
    ('{"method": "ngram"}', "needs num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', r"num_speculative_tokens must be in \[1, 16\]"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min <= prompt_lookup_max"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}', "unsupported keys"),
    ('{"method": "ngram", "num_speculative_tokens": "2"}', "expected integers"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}', "disable_by_batch_size must be"),
])
def test_bad_speculative_config_is_refused_at_start(text, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=text)


def _run(engine: LLMEngine, prompts, params: SamplingParams) -> tuple[list[tuple], int]:
    """Per prompt: (token ids, text, finish reason, stop reason); and the number of steps."""
    for i, ids in enumerate(prompts):
        engine.submit(engine.prepare(GenerateRequest(f"r{i}", params, prompt_token_ids=tuple(ids))))
    outs = {f"r{i}": [[], "", None, None] for i in range(len(prompts))}
    steps = 0
    while engine.has_work():
        steps += 1
        for d in engine.step():
            out = outs[d.request_id]
            out[0] += d.token_ids
            out[1] += d.text
            out[2], out[3] = d.finish_reason, d.stop_reason
    assert engine.blocks.num_used_blocks == 0
    return [tuple(outs[f"r{i}"]) for i in range(len(prompts))], steps


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(4)
    pattern = [rng.randrange(1, vocab) for _ in range(7)]
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in (3, 40, 90)] + [pattern * 6, pattern[:3] * 10]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = save_checkpoint(tmp_path_factory.mktemp("spec") / "llama", "llama")
    return path, hf_greedy(path, _prompts(1024), max_tokens=48)


@pytest.mark.parametrize("block_size, num_blocks", [(16, 4096), (1, 4096), (16, 14)])  # 14 x 16: preemption
def test_greedy_tokens_equal_transformers(checkpoint, block_size, num_blocks):
    path, expected = checkpoint
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", block_size=block_size, num_kv_blocks=num_blocks,
                                    speculative_config=SPEC))
    outs, steps = _run(engine, _prompts(1024), SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    assert [o[0] for o in outs] == expected
    stats = engine.spec_stats
    assert stats.num_accepted > 0 and stats.num_proposed > stats.num_accepted  # both paths taken
    if num_blocks > 14:
        assert steps < 48 + 1  # a step yielded more than one token


@pytest.mark.parametrize("fields", [
    {"max_tokens": 33}, {"max_tokens": 34}, {"max_tokens": 64, "ignore_eos": False},
    {"max_tokens": 64, "stop_token_ids": "later"}, {"max_tokens": 64, "stop": "later"},
    {"max_tokens": 64, "stop": "later", "include_stop_str_in_output": True},
])
def test_endings_match_the_engine_without_speculation(fields):
    """Several tokens a step must end a request where one token a step would: at max_tokens, EOS,
    a stop token or a stop string (its text cut the same way)."""
    tiny_prompts = [[5, 6, 7, 8] * 8, [11, 12] * 20, list(range(100, 140))]
    plain = LLMEngine(EngineConfig(model="tiny"))
    reference, _ = _run(plain, tiny_prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    fields = dict(fields)
    # endings late enough that speculation has begun: a token, or 3 characters, of each answer's second half
    if fields.get("stop_token_ids") == "later":
        fields["stop_token_ids"] = tuple({ref[0][40] for ref in reference})
    if fields.get("stop") == "later":
        fields["stop"] = tuple(ref[1][len(ref[1]) * 2 // 3:][:3] for ref in reference)
    params = SamplingParams(temperature=0, **{"ignore_eos": True, **fields})
    want, _ = _run(LLMEngine(EngineConfig(model="tiny")), tiny_prompts, params)
    spec = LLMEngine(EngineConfig(model="tiny", speculative_config=SPEC))
    got, _ = _run(spec, tiny_prompts, params)
    assert got == want
    assert spec.spec_stats.num_accepted > 0
    if "stop" in fields or "stop_token_ids" in fields:  # the case is the ending it names
        assert FinishReason.STOP in {o[2] for o in want}


def test_no_proposals_while_more_sequences_run_than_disable_by_batch_size():
    prompts = [[5, 6, 7, 8] * 8, [11, 12] * 20, list(range(100, 140))]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    capped = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "disable_by_batch_size": 2}'
    for cap_prompts, speculates in ((prompts, False), (prompts[:2], True)):
        engine = LLMEngine(EngineConfig(model="tiny", speculative_config=capped))
        _run(engine, cap_prompts, params)
        assert (engine.spec_stats.num_checks > 0) is speculates


def test_requests_whose_logits_are_edited_do_not_speculate():
    prompts = [[5, 6, 7, 8] * 8]
    for params in (SamplingParams(max_tokens=20, temperature=0.5, seed=2, ignore_eos=True, logprobs=2),
                   SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3),
                   SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, min_tokens=5),
                   SamplingParams(max_tokens=20, temperature=1.0, top_k=1, seed=7, ignore_eos=True)):
        want, _ = _run(LLMEngine(EngineConfig(model="tiny")), prompts, params)
        spec = LLMEngine(EngineConfig(model="tiny", speculative_config=SPEC))
        got, steps = _run(spec, prompts, params)
        assert got == want and spec.spec_stats.num_checks == 0 and steps == 20


def test_sampled_proposals_keep_the_models_distribution():
    """Speculative sampling with certain proposals: the first token taken is distributed as p0
    whatever was proposed, and the next one, after a kept proposal, as p1 (fixed seed: no flakes)."""
    import torch

    from services.worker.engine.sampler import sample_proposed

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 1.5], [1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8)
    gen = torch.Generator().manual_seed(0)
    num = 40000
    first, second = torch.zeros(4), torch.zeros(4)
    for _ in range(num):
        taken = sample_proposed(logits, params, gen, [1, 3])
        first[taken[0].token_id] += 1
        if taken[0].token_id == 1:
            second[taken[1].token_id] += 1
    from services.worker.engine.sampler import _filter

    def target(row):
        return torch.softmax(_filter(row / params.temperature, params), dim=-1)

    assert torch.allclose(first / num, target(logits[0]), atol=0.01)
    assert torch.allclose(second / second.sum(), target(logits[1]), atol=0.015)


def test_a_sampled_request_that_cannot_vary_speculates_to_the_greedy_tokens():
    """top_k 1 at temperature 1 samples from a one-hot distribution: through the sampled path's
    checks (sample_proposed) it must give the greedy tokens, with fewer steps."""
    prompts = [[5, 6, 7, 8] * 8, [11, 12] * 20]
    want, plain_steps = _run(LLMEngine(EngineConfig(model="tiny")), prompts,
                             SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    spec = LLMEngine(EngineConfig(model="tiny", speculative_config=SPEC))
    got, steps = _run(spec, prompts, SamplingParams(max_tokens=48, temperature=1.0, top_k=1, ignore_eos=True))
    assert got == want and spec.spec_stats.num_accepted > 0 and steps < plain_steps


def test_greedy_logprobs_come_with_every_accepted_token():
    prompts = [[5, 6, 7, 8] * 8, [11, 12] * 20]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3)

    def logprobs(engine):
        for i, ids in enumerate(prompts):
            engine.submit(engine.prepare(GenerateRequest(f"r{i}", params, prompt_token_ids=tuple(ids))))
        out = {f"r{i}": [] for i in range(len(prompts))}
        while engine.has_work():
            for d in engine.step():
                assert len(d.logprobs) == len(d.token_ids)
                out[d.request_id] += [(lp.token_id, lp.logprob, [t[0] for t in lp.top]) for lp in d.logprobs]
        return out

    want = logprobs(LLMEngine(EngineConfig(model="tiny")))
    spec = LLMEngine(EngineConfig(model="tiny", speculative_config=SPEC))
    got = logprobs(spec)
    assert spec.spec_stats.num_accepted > 0
    for rid in want:
        assert [(t, top) for t, _, top in got[rid]] == [(t, top) for t, _, top in want[rid]]
        assert [lp for _, lp, _ in got[rid]] == pytest.approx([lp for _, lp, _ in want[rid]], abs=1e-4)
