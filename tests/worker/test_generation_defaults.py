"""A checkpoint's generation_config.json as the default of what a request leaves unset (vLLM's
--generation-config auto | vllm | DIR)."""

from __future__ import annotations

import json

import pytest

from services.runtime.wire import GenerateCall
from services.worker.model.generation_defaults import sampling_defaults
from services.worker.wire_convert import to_generate_request


def _model(tmp_path, **config):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": True, **config}))
    return tmp_path


def test_the_sampling_fields_of_the_generation_config(tmp_path):
    model = _model(tmp_path, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, min_p=0,
                   max_new_tokens=512)
    assert sampling_defaults("auto", model) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                "repetition_penalty": 1.05, "min_p": 0.0}
    assert sampling_defaults("vllm", model) == {}
    assert sampling_defaults(str(model), tmp_path / "elsewhere") == sampling_defaults("auto", model)
    assert sampling_defaults("auto", _model(tmp_path, top_k=0)) == {"top_k": None}  # 0: no cut, as HF
    assert sampling_defaults("auto", tmp_path / "no-such-model") == {}  # a checkpoint without one


@pytest.mark.parametrize("config,words", [({"temperature": -1}, "temperature=-1"), ({"top_p": 0}, "top_p=0"),
                                          ({"top_k": 2.5}, "top_k=2.5"), ({"temperature": "hot"}, "temperature='hot'")])
def test_a_bad_value_is_refused_naming_the_file_and_field(tmp_path, config, words):
    with pytest.raises(ValueError, match=words):
        sampling_defaults("auto", _model(tmp_path, **config))


def test_a_named_directory_must_hold_one(tmp_path):
    with pytest.raises(ValueError, match="no generation_config.json"):
        sampling_defaults(str(tmp_path), tmp_path)


def test_what_a_request_sets_wins_over_the_defaults():
    defaults = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    unset = to_generate_request(GenerateCall("r", {"max_tokens": 4}), defaults).sampling
    assert (unset.temperature, unset.top_k, unset.top_p) == (0.7, 20, 0.8)
    mine = to_generate_request(GenerateCall("r", {"max_tokens": 4, "temperature": 0.0, "top_k": None}), defaults)
    assert (mine.sampling.temperature, mine.sampling.top_k, mine.sampling.top_p) == (0.0, None, 0.8)
