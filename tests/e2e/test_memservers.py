"""Memory servers and DistAttention, end to end: real router, worker(s) and memservers as
processes, real HTTP and real UCX on loopback. Local pool: 32 blocks of 16 tokens (512 tokens)."""

from __future__ import annotations

import asyncio
import json
import os
import random

import aiohttp
import pytest

from services.launch.probe import get_json
from services.worker.engine.api import GenerateRequest, SamplingParams
from tests.e2e.cluster import cluster_view, running_cluster, wait_for

LOCAL_BLOCKS = 32
WORKER_ARGS = ("--kv-blocks", str(LOCAL_BLOCKS))
MEMSERVER_CAPACITY = "12MiB"  # 384 blocks of the tiny model (32 KiB each, fp32)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


def offline_texts(prompts: list[list[int]], max_tokens: int, **engine_config) -> list[str]:
    """All-local reference: one engine whose pool holds everything (text of the greedy tokens);
    engine_config: more EngineConfig settings (e.g. kv_cache_dtype)."""
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=4096, **engine_config))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.submit(engine.prepare(GenerateRequest(f"ref{i}", params, prompt_token_ids=tuple(ids))))
    out = {f"ref{i}": "" for i in range(len(prompts))}
    while engine.has_work():
        for d in engine.step():
            out[d.request_id] += d.text
    return [out[f"ref{i}"] for i in range(len(prompts))]


async def stream_text(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                      on_delta=None) -> tuple[str, int]:
    """Streams a greedy completion; returns (text, completion_tokens from usage)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, usage = "", None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                text += choice["text"]
                if on_delta is not None:
                    on_delta()
            usage = event.get("usage") or usage
    return text, usage["completion_tokens"]


def used_per_memserver(view: dict) -> dict[str, int]:
    return {m["memserver_id"]: m["num_used_blocks"] for m in view["memservers"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("memservers"), num_workers=1, router_args=("--heartbeat-timeout", "2"),
                         worker_args=WORKER_ARGS, num_memservers=2, memserver_capacity=MEMSERVER_CAPACITY) as c:
        yield c
        c.wait_zero_used_blocks()


async def test_context_8x_beyond_the_worker_matches_all_local_and_transformers(cluster):
    prompt = _prompt(8 * LOCAL_BLOCKS * 16 + 50, seed=1)  # 4146 tokens
    async with aiohttp.ClientSession() as session:
        text, n = await stream_text(session, cluster.router.url, prompt, 16)
    (expected,) = await asyncio.to_thread(offline_texts, [prompt], 16)
    assert n == 16 and text == expected
    hf = await asyncio.to_thread(_transformers_text, prompt, 16)
    assert text == hf
    cluster.wait_zero_used_blocks()
    # Their attention takes every core (the worker waits meanwhile), its threads sleeping between calls.
    for memserver in cluster.memservers:
        started = next(line for line in memserver.log_text().splitlines() if "memserver_started" in line)
        assert f"attention_threads={len(os.sched_getaffinity(0))}" in started and "omp_wait_policy='PASSIVE'" in started


def _transformers_text(prompt: list[int], max_tokens: int) -> str:
    import torch
    import transformers

    from services.worker.model.tiny import materialize_tiny

    path = str(materialize_tiny())
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)


def test_the_next_question_on_a_long_document_reads_its_cached_kv_on_the_memservers(cluster):
    import openai

    from tests.e2e.cluster import worker_stats

    doc = _prompt(4 * LOCAL_BLOCKS * 16, seed=3)  # 2048 tokens: 4x the worker's pool
    question = _prompt(24, seed=4)
    expected = offline_texts([doc, doc + question], 8)
    with openai.OpenAI(base_url=cluster.router.url + "/v1", api_key="unused", max_retries=0) as client:
        first = client.completions.create(model="tiny", prompt=doc, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert first.choices[0].text == expected[0] and first.usage.prompt_tokens_details.cached_tokens == 0
        # The document's spilled blocks stay on the memory servers, and no running request uses them.
        stats = worker_stats(cluster.workers[0])
        assert stats["num_remote_blocks"] == stats["num_remote_cached_blocks"] >= 2048 // 16 - LOCAL_BLOCKS
        # the memory servers' count reaches /cluster with their next heartbeat
        wait_for(lambda: sum(used_per_memserver(cluster_view(cluster.router)).values())
                 == stats["num_remote_cached_blocks"], 10.0, "the memory servers to hold the cached blocks")
        second = client.completions.create(model="tiny", prompt=doc + question, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert second.choices[0].text == expected[1]
    assert second.usage.prompt_tokens_details.cached_tokens == 2048  # every block of the document
    cluster.wait_zero_used_blocks()  # which first tells the workers to forget cached prefixes

    # vLLM's POST /reset_prefix_cache on the router does the same.
    with openai.OpenAI(base_url=cluster.router.url + "/v1", api_key="unused", max_retries=0) as client:
        again = client.completions.create(model="tiny", prompt=doc, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert again.choices[0].text == expected[0] and again.usage.prompt_tokens_details.cached_tokens == 0
    status, body = get_json(cluster.router.url + "/reset_prefix_cache", method="POST", timeout=30.0)
    assert status == 200 and body["workers"][worker_stats(cluster.workers[0])["worker_id"]]["num_remote_blocks"] > 0
    assert sum(used_per_memserver(cluster_view(cluster.router)).values()) == 0
    cluster.wait_zero_used_blocks()


async def test_concurrent_long_requests_use_both_memservers(cluster):
    prompts = [_prompt(700 + 90 * i, seed=10 + i) for i in range(8)]
    expected = await asyncio.to_thread(offline_texts, prompts, 12)
    seen_used: dict[str, int] = {}

    async def watch(stop: asyncio.Event):
        while not stop.is_set():
            for name, used in used_per_memserver(await asyncio.to_thread(cluster_view, cluster.router)).items():
                seen_used[name] = max(seen_used.get(name, 0), used)
            await asyncio.sleep(0.2)

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(stop))
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(stream_text(session, cluster.router.url, p, 12) for p in prompts))
    stop.set()
    await watcher
    assert [t for t, _ in results] == expected
    assert len(seen_used) == 2 and all(v > 0 for v in seen_used.values()), seen_used
    cluster.wait_zero_used_blocks()
    view = cluster_view(cluster.router)
    assert all(m["num_used_blocks"] == 0 for m in view["memservers"]) and view["lent"] == []
