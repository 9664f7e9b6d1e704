"""vLLM's --speculative-config (ngram), end to end: a worker that speculates streams the same greedy
text as an engine that does not, in fewer chunks (a step yields several tokens), also while most of
the sequence's KV lives on a memory server."""

from __future__ import annotations

import json
import random

import pytest

from tests.e2e.cluster import get, running_cluster, wait_for, worker_stats
from tests.e2e.test_memservers import offline_texts

SPEC = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'
LOCAL_BLOCKS = 8  # 128 tokens: the prompts below spill most of their KV
MAX_TOKENS = 96


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    pattern = [rng.randrange(3, 32000) for _ in range(25)]
    return [rng.randrange(3, 32000) for _ in range(60)] + pattern * 10  # 310 tokens


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    worker_args = ("--kv-blocks", str(LOCAL_BLOCKS), "--speculative-config", SPEC)
    with running_cluster(tmp_path_factory.mktemp("spec"), worker_args=worker_args, num_memservers=1,
                         memserver_capacity="8MiB") as c:
        yield c
        c.wait_zero_used_blocks()
        exit_codes = c.stop()
    assert set(exit_codes.values()) == {0}


def _stream(url: str, prompt: list[int]) -> tuple[str, int, int]:
    """(text, number of chunks with text, completion_tokens) of a greedy streamed completion."""
    import urllib.request

    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    text, chunks, usage = "", 0, None
    with urllib.request.urlopen(request, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event["choices"]:
                text += choice["text"]
                chunks += bool(choice["text"])
            usage = event.get("usage") or usage
    return text, chunks, usage["completion_tokens"]


def test_speculating_worker_streams_the_same_text_in_fewer_chunks(cluster):
    prompts = [_prompt(1), _prompt(2)]
    expected = offline_texts(prompts, MAX_TOKENS)
    results = [_stream(cluster.router.url, p) for p in prompts]
    assert [r[0] for r in results] == expected
    assert all(r[2] == MAX_TOKENS for r in results)
    stats = worker_stats(cluster.workers[0])
    assert stats["num_spec_accepted"] > 0
    # the router's /metrics shows the same counts (from the worker's heartbeats)
    wait_for(lambda: f'kvmesh_worker_spec_decode_accepted_tokens_total{{worker="{stats["worker_id"]}"}} '
                     f'{float(stats["num_spec_accepted"])}' in get(cluster.router.url + "/metrics")[1].decode(),
             10, "the router's spec decode metrics")
    # accepted proposals arrive with the token before them: fewer chunks than tokens
    assert sum(r[1] for r in results) < 2 * MAX_TOKENS
