"""vLLM's LoRA serving, end to end: a worker started with --enable-lora --lora-modules serves each
adapter as a model of its own. A request naming it gets PEFT's greedy tokens for that adapter, also
when its KV spills to a memory server; the base model's name still gets the base model's tokens.
Adapters loaded and unloaded at runtime (vLLM's /v1/load_lora_adapter) behave the same."""

from __future__ import annotations

import json
import random

import openai
import pytest

from services.worker.model.tiny import materialize_tiny
from tests.e2e.cluster import TOKEN_HEADER, running_cluster
from tests.worker.test_lora import ALL_PROJECTIONS, peft_greedy, save_adapter

LOCAL_BLOCKS = 8  # 128 tokens: a 300-token prompt spills most of its KV to the memory server
PROMPT_LEN = 300
MAX_TOKENS = 24  # as peft_greedy


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(PROMPT_LEN)]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "sql"
    save_adapter(materialize_tiny(), path, seed=5, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, adapter):
    worker_args = ("--kv-blocks", str(LOCAL_BLOCKS), "--enable-lora", "--lora-modules", f"sql={adapter}")
    with running_cluster(tmp_path_factory.mktemp("lora"), worker_args=worker_args, num_memservers=1,
                         memserver_capacity="8MiB", router_args=("--allow-runtime-lora-updating",)) as c:
        yield c
        c.wait_zero_used_blocks()
        exit_codes = c.stop()
    assert set(exit_codes.values()) == {0}


@pytest.fixture
def client(cluster):
    with cluster.openai_client() as c:
        yield c


def test_models_lists_the_adapter_under_its_base(client, adapter):
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(cards) == {"tiny", "sql"}
    assert cards["sql"]["root"] == str(adapter.resolve()) and cards["sql"]["parent"] == "tiny"
    assert cards["tiny"]["parent"] is None


def test_adapter_requests_match_peft_with_spilled_kv(cluster, client, adapter):
    prompts = [_prompt(1), _prompt(2)]
    expected = {"sql": peft_greedy(materialize_tiny(), adapter, prompts),
                "tiny": peft_greedy(materialize_tiny(), None, prompts)}
    assert expected["sql"] != expected["tiny"]
    prompt_tokens = []
    for model in ("sql", "tiny", "sql"):  # the second sql run may find its prompt in the prefix cache
        for ids, want in zip(prompts, expected[model]):
            resp = client.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
            assert resp.model == model
            assert resp.choices[0].model_extra["token_ids"] == want, model
            prompt_tokens.append(resp.usage.prompt_tokens)
    # 324 tokens each, against the worker's 128 local ones: served only by spilling to the memory server
    assert prompt_tokens == [PROMPT_LEN] * 6

def test_streamed_chat_names_the_adapter(client):
    stream = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"sql"}
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_unknown_model_lists_the_adapter(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="sql-v2", prompt="hi", max_tokens=2)
    assert "available: ['sql', 'tiny']" in json.dumps(info.value.body)



def _post(cluster, path: str, body: dict, base: str | None = None, headers: dict | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request((base or cluster.router.url) + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _greedy_ids(client, model: str, ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    resp = client.completions.create(model=model, prompt=ids, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert resp.model == model
    return resp.choices[0].model_extra["token_ids"]


def test_adapters_load_and_unload_at_runtime(cluster, client, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_adapters")
    for seed, name in ((6, "v2"), (7, "v3")):
        save_adapter(materialize_tiny(), root / name, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    prompt = _prompt(3)
    expected = {name: peft_greedy(materialize_tiny(), root / name, [prompt])[0] for name in ("v2", "v3")}

    assert _post(cluster, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(root / "v2")}) == (
        200, "Success: LoRA adapter 'extra' added successfully.")
    assert "extra" in {m.id for m in client.models.list().data}
    assert _greedy_ids(client, "extra", prompt) == expected["v2"]

    status, text = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(root / "v3")})
    assert status == 400 and "The lora adapter 'extra' has already been loaded." in text
    status, text = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(root)})
    assert status == 400 and "has no adapter_config.json" in text
    status, text = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(root / "v3")})
    assert status == 400 and "is a base model's name" in text
    worker = cluster.workers[0].url  # the worker's own endpoint, as the router calls it
    for body, message in [({"op": "reload", "lora_name": "x"}, "expected {op: load|unload"),
                          ({"op": "load", "lora_name": "x"}, "expected {op: load|unload"),
                          ({"op": "load", "lora_name": "tiny", "lora_path": str(root / "v3")}, "base model's name")]:
        status, text = _post(cluster, "/internal/lora", body, base=worker, headers=TOKEN_HEADER)
        assert status == 400 and message in text, (body, text)
    assert {m.id for m in client.models.list().data} == {"tiny", "sql", "extra"}

    assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "extra"}) == (
        200, "Success: LoRA adapter 'extra' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt=prompt, max_tokens=2)
    assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 404

    # The same name, another adapter: its answer is v3's, not v2's KV from the prefix cache
    assert _post(cluster, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(root / "v3")})[0] == 200
    assert _greedy_ids(client, "extra", prompt) == expected["v3"]
    assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 200


def test_a_stream_keeps_its_adapter_when_it_is_unloaded(cluster, client, tmp_path_factory):
    path = tmp_path_factory.mktemp("unload_adapter") / "a"
    save_adapter(materialize_tiny(), path, seed=8, r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"])
    prompt = _prompt(4)[:40]
    expected = peft_greedy(materialize_tiny(), path, [prompt], max_tokens=160)[0]
    assert expected != peft_greedy(materialize_tiny(), None, [prompt], max_tokens=160)[0]
    assert _post(cluster, "/v1/load_lora_adapter", {"lora_name": "going", "lora_path": str(path)})[0] == 200
    stream = client.completions.create(model="going", prompt=prompt, max_tokens=160, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    ids, unloaded = [], False
    for chunk in stream:
        ids.extend(chunk.choices[0].model_extra["token_ids"] or [])
        if not unloaded:  # after the first token: the request is running
            assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "going"})[0] == 200
            unloaded = True
    assert ids == expected and len(ids) == 160


def test_a_worker_that_joins_later_is_given_the_adapters_loaded_at_runtime(tmp_path_factory):
    from tests.e2e.cluster import num_live_workers, wait_for

    root = tmp_path_factory.mktemp("given_adapters")
    save_adapter(materialize_tiny(), root / "late", seed=9, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    prompt = _prompt(5)[:60]
    expected = peft_greedy(materialize_tiny(), root / "late", [prompt])[0]
    with running_cluster(tmp_path_factory.mktemp("given"), worker_args=("--enable-lora",),
                         router_args=("--allow-runtime-lora-updating",)) as cluster:
        assert _post(cluster, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(root / "late")})[0] == 200
        cluster.add_worker("--enable-lora")  # say, the replacement of a worker that died
        cluster.wait_ready(2)
        wait_for(lambda: "event='lora_given'" in cluster.router.log_text(), 60, "the router to give it the adapter",
                 cluster.procs)
        first = cluster.workers[0]
        assert first.terminate() == 0
        wait_for(lambda: num_live_workers(cluster.router) == 1, 30, "the first worker to leave")
        with cluster.openai_client() as client:  # only the newcomer is left to answer
            assert _greedy_ids(client, "late", prompt) == expected
        # Unloaded, it is no longer given to workers that join
        assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 200
        third = cluster.add_worker("--enable-lora")
        cluster.wait_ready(2)
        with cluster.openai_client() as client:
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="late", prompt=prompt, max_tokens=2)
        assert cluster.router.log_text().count("event='lora_given'") == 1 and third.alive
