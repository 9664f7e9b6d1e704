"""The async engine API the services use: streaming deltas, abort, sampling, bad input."""

from __future__ import annotations

import asyncio

import pytest

from services.worker.engine.api import (
    ContextLengthExceeded, FinishReason, GenerateRequest, InvalidRequest, SamplingParams,
)
from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llm():
    return LLMEngine(EngineConfig(model="tiny", num_kv_blocks=64, max_num_batched_tokens=128))


@pytest.fixture
async def engine(llm):
    eng = AsyncEngine(llm.config, engine=llm)
    await eng.start()
    yield eng
    await eng.stop()
    assert llm.blocks.num_used_blocks == 0  # every test ends with no KV block in use


async def collect(engine, request):
    deltas = [d async for d in engine.generate(request)]
    return deltas, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


async def test_concurrent_requests_stream_and_concatenate(engine, llm):
    reqs = [GenerateRequest(f"c{i}", SamplingParams(max_tokens=12 + i, temperature=0, ignore_eos=True),
                            prompt=f"request number {i} says hello") for i in range(6)]
    results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    for i, (deltas, text, ids) in enumerate(results):
        assert len(ids) == 12 + i
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert text == llm.tokenizer.decode(ids)
        assert deltas[-1].num_prompt_tokens == len(llm.tokenizer.encode(f"request number {i} says hello"))
    # Batched greedy equals the same request alone.
    alone = await collect(engine, GenerateRequest("alone", reqs[3].sampling, prompt=reqs[3].prompt))
    assert alone[2] == results[3][2]


async def test_chat_messages_use_the_chat_template(engine, llm):
    msgs = ({"role": "user", "content": "Hi there"},)
    deltas, _, _ = await collect(engine, GenerateRequest("chat", SamplingParams(max_tokens=3, temperature=0), messages=msgs))
    expected = llm.tokenizer.encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert deltas[0].num_prompt_tokens == len(expected)


async def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    runs = await asyncio.gather(*(collect(engine, GenerateRequest(f"s{i}", params, prompt="once upon")) for i in range(3)))
    assert runs[0][2] == runs[1][2] == runs[2][2]
    other = await collect(engine, GenerateRequest("s-other", SamplingParams(
        max_tokens=16, temperature=1.0, seed=99, ignore_eos=True), prompt="once upon"))
    assert other[2] != runs[0][2]


async def test_stop_token_ids_and_min_tokens(engine):
    _, _, ids = await collect(engine, GenerateRequest("probe", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), prompt="stop me"))
    stop_at = ids[3]
    deltas, _, got = await collect(engine, GenerateRequest("stop", SamplingParams(
        max_tokens=6, temperature=0, stop_token_ids=(stop_at,)), prompt="stop me"))
    assert got == ids[: ids.index(stop_at) + 1]
    assert deltas[-1].finish_reason is FinishReason.STOP
    # min_tokens bans the stop id until enough tokens exist.
    _, _, got = await collect(engine, GenerateRequest("min", SamplingParams(
        max_tokens=6, temperature=0, stop_token_ids=(ids[0],), min_tokens=6, ignore_eos=True), prompt="stop me"))
    assert len(got) == 6 and got[0] != ids[0]


async def test_logprobs(engine):
    deltas, _, ids = await collect(engine, GenerateRequest("lp", SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True), prompt="hello"))
    for d in deltas:
        (lp,) = d.logprobs
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy picks the best
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]


async def test_a_request_whose_sampling_fails_ends_alone(engine, monkeypatch):
    """A sampler error on one row (e.g. multinomial on NaN) ends that request with an error event;
    the others in the batch go on, and its blocks are freed (checked by the fixture)."""
    from services.worker.engine import sampler

    real_filter = sampler._filter

    def failing(logits, params):
        if params.top_k == 7:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_filter(logits, params)

    monkeypatch.setattr(sampler, "_filter", failing)
    bad = GenerateRequest("bad", SamplingParams(max_tokens=8, temperature=1.0, top_k=7), prompt="both start")
    good = GenerateRequest("good", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), prompt="both start")
    (bad_deltas, _, _), (good_deltas, _, good_ids) = await asyncio.gather(collect(engine, bad), collect(engine, good))
    assert bad_deltas[-1].finish_reason is FinishReason.ERROR and "sampling failed" in bad_deltas[-1].error
    assert good_deltas[-1].finish_reason is FinishReason.LENGTH and len(good_ids) == 24


async def test_abort_frees_blocks_and_ends_stream(engine, llm):
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    seen = []

    async def consume():
        async for d in engine.generate(GenerateRequest("long", params, prompt="a long one")):
            seen.append(d)

    task = asyncio.create_task(consume())
    while len(seen) < 3:
        await asyncio.sleep(0.01)
    assert llm.blocks.num_used_blocks > 0
    await engine.abort("long")
    await asyncio.wait_for(task, 10)
    assert seen[-1].finish_reason is FinishReason.ABORT
    assert llm.blocks.num_used_blocks == 0


async def test_consumer_going_away_aborts(engine, llm):
    gen = engine.generate(GenerateRequest("gone", SamplingParams(max_tokens=500, temperature=0, ignore_eos=True), prompt="x"))
    await gen.__anext__()
    await gen.aclose()
    for _ in range(200):
        if llm.blocks.num_used_blocks == 0 and not llm.has_work():
            break
        await asyncio.sleep(0.01)
    assert llm.blocks.num_used_blocks == 0


@pytest.mark.parametrize("fields,params,error,match", [
    ({"prompt": ""}, SamplingParams(), InvalidRequest, "prompt is empty"),
    ({}, SamplingParams(), InvalidRequest, "one of prompt"),
    ({"messages": ()}, SamplingParams(), InvalidRequest, "messages must not be empty"),
    ({"prompt": "hi"}, SamplingParams(max_tokens=0), InvalidRequest, r"max_tokens must be at least 1 \(0 only with echo\), got 0"),
    ({"prompt": "hi"}, SamplingParams(temperature=-0.5), InvalidRequest, "temperature must be a finite number >= 0, got -0.5"),
    ({"prompt": "hi"}, SamplingParams(top_p=1.5), InvalidRequest, r"top_p must be in \(0, 1\], got 1.5"),
    ({"prompt": "hi"}, SamplingParams(top_p=0), InvalidRequest, "top_p"),
    ({"prompt": "hi"}, SamplingParams(truncate_prompt_tokens=0), InvalidRequest, "truncate_prompt_tokens must be >= 1"),
    ({"prompt_token_ids": (1, 99999)}, SamplingParams(), InvalidRequest, r"\[0, 32000\)"),
    ({"prompt": "hi"}, SamplingParams(max_tokens=40000), ContextLengthExceeded, "maximum context length is 32768"),
    ({"prompt": "hi"}, SamplingParams(max_tokens=2000), ContextLengthExceeded, "KV cache holds 1024 tokens"),
])
async def test_bad_input_is_refused_and_engine_keeps_serving(engine, fields, params, error, match):
    with pytest.raises(error, match=match):
        await collect(engine, GenerateRequest("bad", params, **fields))
    _, _, ids = await collect(engine, GenerateRequest("good", SamplingParams(max_tokens=3, temperature=0), prompt="fine"))
    assert 1 <= len(ids) <= 3


async def test_duplicate_request_id_is_refused(engine):
    gen = engine.generate(GenerateRequest("dup", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), prompt="x"))
    await gen.__anext__()
    with pytest.raises(InvalidRequest, match="already in use"):
        await collect(engine, GenerateRequest("dup", SamplingParams(max_tokens=2), prompt="y"))
    await gen.aclose()


async def test_max_model_len_caps_the_context_below_the_models_own(llm):
    capped = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=64, max_num_batched_tokens=128, max_model_len=40))
    engine = AsyncEngine(capped.config, engine=capped)
    await engine.start()
    try:
        with pytest.raises(ContextLengthExceeded, match="maximum context length is 40 tokens"):
            await collect(engine, GenerateRequest("long", SamplingParams(max_tokens=38), prompt="one two three"))
        prompt_len = len(capped.tokenizer.encode("one two three"))
        deltas, _, ids = await collect(engine, GenerateRequest(
            "fits", SamplingParams(max_tokens=40 - prompt_len, temperature=0, ignore_eos=True), prompt="one two three"))
        assert len(ids) == 40 - prompt_len and deltas[-1].finish_reason is FinishReason.LENGTH
        assert capped.tokenize({"prompt": "one two three"})["max_model_len"] == 40
    finally:
        await engine.stop()
    assert capped.blocks.num_used_blocks == 0
    with pytest.raises(ValueError, match="max_model_len=40000 exceeds this model's max_position_embeddings=32768"):
        LLMEngine(EngineConfig(model="tiny", num_kv_blocks=8, max_model_len=40000))


async def test_allowed_token_ids_are_the_only_tokens_sampled(engine):
    allowed = (345, 346, 1000)
    params = SamplingParams(max_tokens=24, temperature=1.5, seed=3, ignore_eos=True, allowed_token_ids=allowed)
    _, _, ids = await collect(engine, GenerateRequest("allowed", params, prompt="pick"))
    assert len(ids) == 24 and set(ids) <= set(allowed) and len(set(ids)) > 1


async def test_echo_of_a_truncated_prompt_shows_what_was_kept(engine, llm):
    prompt = "one two three four five six seven"
    ids = llm.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=1, temperature=0, echo=True, truncate_prompt_tokens=3)
    deltas, text, _ = await collect(engine, GenerateRequest("echo-cut", params, prompt=prompt))
    assert text.startswith(llm.tokenizer.decode(ids[-3:])) and deltas[-1].num_prompt_tokens == 3


async def test_bad_words_are_never_generated(engine, llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    _, _, ref = await collect(engine, GenerateRequest("words-ref", params, prompt="a story about"))
    word_ids = {tuple(llm.tokenizer.encode(t, add_special_tokens=False)): t
                for t in (llm.tokenizer.decode([i]) for i in ref) if t.strip()}
    token, word = next((ids[0], text) for ids, text in word_ids.items() if len(ids) == 1)  # a one-token word
    banned = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, bad_words=(word.strip(),))
    _, _, out = await collect(engine, GenerateRequest("words", banned, prompt="a story about"))
    assert token in ref and token not in out and len(out) == 16
    assert out[:ref.index(token)] == ref[:ref.index(token)]  # the same until the banned word was due
