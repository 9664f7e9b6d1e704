"""The engine in its own process, behind the front's EngineProcess: same tokens, same errors,
blocks freed on abort, and a dead engine ends open streams with an error instead of hanging."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from services.worker.engine import ipc
from services.worker.engine.api import (
    ContextLengthExceeded, Delta, EngineOverloaded, FinishReason, GenerateRequest, InvalidRequest, SamplingParams,
    KVCapacityBusy, StructuredKind, StructuredOutput, TokenLogprob,
)
from services.worker.engine.client import EngineProcess
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine

CONFIG = EngineConfig(model="tiny", num_kv_blocks=64, max_num_batched_tokens=128)


def test_messages_round_trip():
    request = GenerateRequest("r1", SamplingParams(max_tokens=5, stop=("x", "yz"), stop_token_ids=(3,), logprobs=2),
                              messages=({"role": "user", "content": "hi"},))
    assert ipc.request_from_obj(ipc.request_to_obj(request)) == request
    delta = Delta("r1", (5, 6), "é", 7, 2, FinishReason.STOP,
                  (TokenLogprob(5, "a", -0.5, ((5, "a", -0.5), (9, "b", -1.5))),), None)
    assert ipc.delta_from_obj(ipc.delta_to_obj(delta)) == delta
    err = ipc.error_from_reject(*ipc.reject_message("r1", ContextLengthExceeded("too long", "max_tokens"))[2:])
    assert type(err) is ContextLengthExceeded and err.status == 400 and err.param == "max_tokens"
    err = ipc.error_from_reject(*ipc.reject_message("r1", KVCapacityBusy("busy", "max_tokens"))[2:])
    assert type(err) is KVCapacityBusy and err.status == 503


@pytest.fixture
async def engine():
    deaths = []
    eng = EngineProcess(CONFIG, on_death=lambda: deaths.append(True))
    await eng.start()
    eng.deaths = deaths
    yield eng
    await eng.stop()


async def _wait_free(eng, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        s = eng.stats()
        if s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"blocks not freed: {eng.stats()}")


async def collect(eng, request):
    return [d async for d in eng.generate(request)]


async def test_greedy_tokens_equal_the_in_process_engine(engine):
    reqs = [GenerateRequest(f"g{i}", SamplingParams(max_tokens=10 + i, temperature=0, ignore_eos=True),
                            prompt=f"prompt number {i} is here") for i in range(4)]
    results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    local = LLMEngine(CONFIG)
    for r, deltas in zip(reqs, results):
        local.submit(local.prepare(r))
    expected: dict[str, list[int]] = {}
    while local.has_work():
        for d in local.step():
            expected.setdefault(d.request_id, []).extend(d.token_ids)
    for r, deltas in zip(reqs, results):
        assert [t for d in deltas for t in d.token_ids] == expected[r.request_id]
        assert deltas[-1].finish_reason is FinishReason.LENGTH
    await _wait_free(engine)


async def test_bad_requests_are_refused_before_any_token(engine):
    with pytest.raises(ContextLengthExceeded, match="maximum context length"):
        await collect(engine, GenerateRequest("long", SamplingParams(max_tokens=10**6), prompt="hi"))
    with pytest.raises(InvalidRequest, match="empty"):
        await collect(engine, GenerateRequest("empty", SamplingParams(), prompt=""))
    with pytest.raises(InvalidRequest, match="temperature"):
        await collect(engine, GenerateRequest("temp", SamplingParams(temperature=-1), prompt="hi"))
    deltas = await collect(engine, GenerateRequest("ok", SamplingParams(max_tokens=3, temperature=0), prompt="hi"))
    assert deltas[-1].finish_reason is not None  # the engine kept serving
    await _wait_free(engine)


async def test_abandoned_stream_frees_its_blocks(engine):
    stream = engine.generate(GenerateRequest("a", SamplingParams(max_tokens=200, ignore_eos=True), prompt="go on"))
    await anext(stream)
    assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
    await stream.aclose()
    await _wait_free(engine)


async def test_engine_death_ends_open_streams_with_an_error(engine):
    stream = engine.generate(GenerateRequest("d", SamplingParams(max_tokens=900, ignore_eos=True), prompt="x"))
    await anext(stream)
    os.kill(engine.pid, signal.SIGKILL)
    deltas = [d async for d in stream]
    assert deltas[-1].finish_reason is FinishReason.ERROR and "engine process died" in deltas[-1].error
    await asyncio.sleep(0.6)
    assert engine.deaths == [True]


def test_engine_environment_asks_for_huge_pages_unless_the_operator_chose():
    from services.worker.engine.client import _engine_env

    assert _engine_env({"A": "1"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert _engine_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert _engine_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_engine_openmp_threads_sleep_after_their_region_unless_the_operator_chose():
    from services.worker.engine.client import _engine_env

    assert _engine_env({})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert _engine_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


def _big_schema() -> StructuredOutput:
    """~47K characters: xgrammar takes ~0.5 s on these machines to compile it."""
    fields = {f"field_{i}": {"type": "object", "required": [f"sub_{j}" for j in range(5)],
                             "properties": {f"sub_{j}": {"type": ["string", "integer", "null"], "maxLength": 20}
                                            for j in range(10)}} for i in range(60)}
    schema = {"type": "object", "properties": fields, "required": list(fields)}
    return StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(schema))


async def test_a_grammar_compiles_while_running_streams_keep_generating(engine):
    """A structured output's grammar compiles on its own thread: a stream already running keeps
    getting tokens meanwhile (a synchronous compile would stall it for the whole compile)."""
    events: list[str] = []

    async def run(name, request):
        async for delta in engine.generate(request):
            if delta.token_ids:
                events.append(name)

    running = asyncio.create_task(run("free", GenerateRequest(
        "free", SamplingParams(max_tokens=900, temperature=0, ignore_eos=True), prompt="go on")))
    while not events:
        if running.done():
            running.result()  # raises what went wrong
        await asyncio.sleep(0.01)
    structured = asyncio.create_task(run("json", GenerateRequest(
        "json", SamplingParams(max_tokens=4, temperature=0, structured=_big_schema()), prompt="as JSON")))
    submitted = len(events)
    await structured
    assert events.count("json") == 4
    assert events.index("json") - submitted >= 5  # tokens of the other stream while the grammar compiled
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await _wait_free(engine)


async def test_a_request_aborted_while_its_grammar_compiles_never_runs(engine):
    first = engine.generate(GenerateRequest("gone", SamplingParams(max_tokens=500, structured=_big_schema()),
                                            prompt="as JSON"))
    pending = asyncio.ensure_future(anext(first))
    await asyncio.sleep(0.05)  # submitted; its grammar is compiling
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    await first.aclose()  # the front aborts it
    # The same schema again: it compiles after the first one, on the same thread.
    second = engine.generate(GenerateRequest("next", SamplingParams(max_tokens=500, structured=_big_schema()),
                                             prompt="as JSON"))
    await anext(second)
    assert engine.stats().num_running == 1  # "gone" was never admitted
    await second.aclose()
    await _wait_free(engine)
    with pytest.raises(InvalidRequest, match="does not compile"):  # and a bad one is still a refusal
        await collect(engine, GenerateRequest("bad", SamplingParams(structured=StructuredOutput(
            StructuredKind.REGEX, "a(")), prompt="x"))


async def test_a_request_whose_grammar_compiles_when_the_engine_stops_is_refused_for_another_worker():
    eng = EngineProcess(CONFIG, on_death=lambda: None)
    await eng.start()
    stream = eng.generate(GenerateRequest("late", SamplingParams(max_tokens=50, structured=_big_schema()),
                                          prompt="as JSON"))
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)  # submitted; its grammar is compiling
    await eng.stop()
    with pytest.raises(EngineOverloaded, match="stopping"):  # a 503: the router tries another worker
        await pending
