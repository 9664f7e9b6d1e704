"""A long prompt's spilled KV stays cached on the memory servers (in-process fake here; real
processes in tests/e2e/test_memservers.py): asking about the same document again reuses it where
it is, with tokens equal to transformers'; the cache gives way to running sequences, to a lost
server, and to a reset."""

from __future__ import annotations

import random

import pytest

from services.worker.engine.api import GenerateRequest, SamplingParams
from tests.worker.checkpoints import save_checkpoint
from tests.worker.test_engine_oracle import hf_greedy
from tests.worker.test_spill import _engine, assert_no_block_leaked

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_checkpoint(tmp_path_factory.mktemp("remote_prefix") / "m", "llama")
    rng = random.Random(11)
    doc, other = ([rng.randrange(1, 1024) for _ in range(900)] for _ in range(2))
    question = [rng.randrange(1, 1024) for _ in range(20)]
    prompts = {"doc": doc, "doc+q": doc + question, "other": other}
    expected = dict(zip(prompts, hf_greedy(path, list(prompts.values()), MAX_TOKENS)))
    return path, prompts, expected


def generate(engine, prompt: list[int], request_id: str = "r") -> tuple[list[int], int]:
    """Greedy tokens and how many prompt tokens came from the prefix cache."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    engine.submit(engine.prepare(GenerateRequest(request_id, params, prompt_token_ids=tuple(prompt))))
    tokens, cached = [], None
    while engine.has_work():
        for delta in engine.step():
            tokens.extend(delta.token_ids)
            cached = delta.num_cached_tokens
    return tokens, cached


def test_the_next_question_on_a_long_document_reuses_its_spilled_kv_where_it_is(model):
    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=2)
    assert generate(engine, prompts["doc"]) == (expected["doc"], 0)
    held = remote.used_blocks()
    assert held >= 40 and engine.stats().num_remote_cached_blocks == held  # its spilled blocks stayed
    spills, calls = remote.num_spills, remote.num_attention_calls

    tokens, cached = generate(engine, prompts["doc+q"])
    assert tokens == expected["doc+q"]
    # every full block of the document: the spilled ones from the memory servers, the rest local
    assert cached == 900 // 16 * 16
    assert remote.num_attention_calls > calls  # attention read the cached blocks there
    assert remote.num_spills - spills <= 2  # only its new tokens pushed older blocks out
    assert_no_block_leaked(engine, remote)


def test_without_prefix_caching_nothing_stays_on_the_memory_servers(model):
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.llm_engine import LLMEngine

    path, prompts, expected = model
    _, remote = _engine(path, remote_servers=1)
    engine = LLMEngine(EngineConfig(model=str(path), block_size=16, num_kv_blocks=8, max_num_batched_tokens=64,
                                    enable_prefix_caching=False), remote=remote)
    assert generate(engine, prompts["doc"]) == (expected["doc"], 0)
    assert remote.used_blocks() == 0
    assert generate(engine, prompts["doc+q"]) == (expected["doc+q"], 0)


def test_cached_blocks_give_way_to_a_request_that_needs_their_room(model):
    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=1, blocks_per_server=56)  # 8 + 56 blocks: 1,024 tokens
    assert generate(engine, prompts["doc"]) == (expected["doc"], 0)
    assert remote.used_blocks() > 56 - 8  # the cache holds nearly all the remote room
    # Admission counts that room as free, and the spill takes it: no preemption, same tokens.
    tokens, cached = generate(engine, prompts["other"])
    assert (tokens, cached) == (expected["other"], 0)
    assert remote.num_spills and engine.scheduler._num_preemptions == 0
    # The document's last blocks were evicted for it, its first ones stayed: asking it again
    # reuses those, and recomputes the rest.
    tokens, cached = generate(engine, prompts["doc+q"])
    assert tokens == expected["doc+q"] and 0 < cached < 900 // 16 * 16
    assert_no_block_leaked(engine, remote)


def test_a_lost_memserver_takes_its_cached_blocks_with_it(model):
    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=1, blocks_per_server=100)
    generate(engine, prompts["doc"])
    assert remote.used_blocks() > 0
    remote.kill("ms0")
    engine.tend()  # between requests: the engine lets go of what it cached there
    assert engine.stats().num_remote_blocks == 0
    remote.servers["ms1"] = type(remote.servers["ms0"])(100, *_pool_args(remote))  # a fresh server joins
    tokens, cached = generate(engine, prompts["doc+q"])
    assert tokens == expected["doc+q"] and cached < 8 * 16  # at most what stayed local
    assert engine.stats().num_remote_blocks == remote.used_blocks()  # nothing counted on the dead server
    assert_no_block_leaked(engine, remote)


def test_two_sequences_share_cached_remote_blocks_and_free_them_once(model):
    path, prompts, expected = model
    engine, remote = _engine(path, remote_servers=2)
    generate(engine, prompts["doc"])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for request_id in ("a", "b"):
        engine.submit(engine.prepare(GenerateRequest(request_id, params, prompt_token_ids=tuple(prompts["doc+q"]))))
    outs: dict[str, list[int]] = {"a": [], "b": []}
    while engine.has_work():
        for delta in engine.step():
            outs[delta.request_id].extend(delta.token_ids)
    assert outs == {"a": expected["doc+q"], "b": expected["doc+q"]}
    assert_no_block_leaked(engine, remote)  # the fake refuses a block freed twice


def _pool_args(remote):
    pool = remote.servers["ms0"].pool  # [L, 2, N, bs, Hkv, D]
    num_layers, _, _, *frame = pool.shape
    return (num_layers, 2, *frame), pool.dtype
