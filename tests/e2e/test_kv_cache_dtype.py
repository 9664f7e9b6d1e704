"""vLLM's --kv-cache-dtype fp8, end to end: the memory servers size their pools for 8-bit blocks (4x
the fp32 model's blocks in the same capacity, as /cluster shows) and hold spilled fp8 KV; a request
whose KV spills gets the same greedy text as an all-local engine with an fp8 cache."""

from __future__ import annotations

import random

import pytest

from tests.e2e.cluster import cluster_view, running_cluster
from tests.e2e.test_memservers import offline_texts

LOCAL_BLOCKS = 8  # 128 tokens: the prompts below spill most of their KV
CAPACITY = "4MiB"  # tiny model blocks: 32 KiB in fp32, 8 KiB in fp8
MAX_TOKENS = 24


def _prompt(seed: int, n: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    worker_args = ("--kv-blocks", str(LOCAL_BLOCKS), "--kv-cache-dtype", "fp8")
    with running_cluster(tmp_path_factory.mktemp("fp8"), worker_args=worker_args, num_memservers=1,
                         memserver_capacity=CAPACITY) as c:
        yield c
        c.wait_zero_used_blocks()
        exit_codes = c.stop()
    assert set(exit_codes.values()) == {0}


def test_spilled_fp8_kv_gives_the_all_local_fp8_text(cluster):
    view = cluster_view(cluster.router)
    (memserver,) = view["memservers"]
    assert memserver["num_blocks"] == 4 * 1024 * 1024 // (8 * 1024)  # fp8 blocks: 4x the fp32 ones
    prompts = [_prompt(1), _prompt(2)]
    expected = offline_texts(prompts, MAX_TOKENS, kv_cache_dtype="fp8")
    with cluster.openai_client() as client:
        got = [client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert got == expected
