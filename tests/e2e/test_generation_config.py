"""vLLM's --generation-config: a request that leaves temperature / top_k unset samples with the
model's generation_config.json values ('auto'), or OpenAI's defaults ('vllm'); what it sets wins.
Two real workers on one router, one per setting, told apart by --served-model-name."""

from __future__ import annotations

import json

import pytest

from services.worker.model.tiny import materialize_tiny
from tests.e2e.cluster import running_cluster
from services.worker.engine.api import GenerateRequest, SamplingParams
from tests.e2e.offline import offline_generate

PROMPT = "The memory servers hold the oldest blocks"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tuned = tmp_path_factory.mktemp("tuned_model")
    for f in materialize_tiny().iterdir():  # the tiny model, with the authors' sampling defaults
        if f.name != "generation_config.json":
            (tuned / f.name).symlink_to(f)
    # top_k 1 samples the likeliest token whatever the temperature: greedy unless the request says otherwise
    (tuned / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "temperature": 0.9,
                                                              "top_k": 1}))
    with running_cluster(tmp_path_factory.mktemp("generation_config"), 0) as c:
        c.add_worker("--served-model-name", "tuned", "tuned-alias", model=str(tuned))
        c.add_worker("--served-model-name", "plain", "--generation-config", "vllm", model=str(tuned))
        c.wait_ready(2)
        yield c
        exit_codes = c.stop()
    assert set(exit_codes.values()) == {0}


@pytest.fixture
def client(cluster):
    with cluster.openai_client() as c:
        yield c


def _texts(client, model: str, **extra) -> list[str]:
    return [client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, seed=seed,
                                      extra_body={"ignore_eos": True, **extra}).choices[0].text for seed in (1, 2, 3)]


def test_unset_fields_take_the_models_generation_config(cluster, client):
    (ref,) = offline_generate([GenerateRequest("g", SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                   ignore_eos=True), prompt=PROMPT)])
    assert _texts(client, "tuned") == [ref.text] * 3  # its top_k 1: greedy
    assert len(set(_texts(client, "tuned", top_k=-1))) == 3  # the request's own: no cut
    assert len(set(_texts(client, "plain"))) == 3  # 'vllm': OpenAI's temperature 1, no top_k
    started = next(line for line in cluster.workers[0].log_text().splitlines() if "engine_started" in line)
    assert "sampling_defaults=" in started and "'top_k': 1" in started


def test_a_worker_answers_to_each_of_its_served_names_under_the_first(client):
    """--served-model-name tuned tuned-alias: both are listed and served; responses name the first, as vLLM."""
    assert sorted(m.id for m in client.models.list().data) == ["plain", "tuned", "tuned-alias"]
    resp = client.completions.create(model="tuned-alias", prompt=PROMPT, max_tokens=2)
    assert resp.model == "tuned" and resp.usage.completion_tokens == 2
