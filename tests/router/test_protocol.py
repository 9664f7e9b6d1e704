import json

import pytest

from services.router.protocol import parse_chat_request, parse_completion_request
from services.runtime.errors import ApiError

LIMITS = {"max_n": 4, "max_stop": 4}
MSG = [{"role": "user", "content": "hi"}]


def chat(**body):
    return parse_chat_request({"model": "m", "messages": MSG, **body}, **LIMITS)


def test_chat_defaults_and_extras():
    p = chat(max_completion_tokens=7, max_tokens=99, stop="x", top_k=-1, ignore_eos=True, min_tokens=2, seed=5, n=3,
             stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    assert p.max_tokens == 7 and p.sampling["max_tokens"] == 7
    assert p.sampling["stop"] == ("x",) and p.sampling["top_k"] is None and p.sampling["ignore_eos"]
    assert p.sampling["logprobs"] == 2 and p.include_usage
    assert p.choice_seeds() == [5, 6, 7]
    assert "skip_special_tokens" not in p.sampling
    assert chat(skip_special_tokens=False).sampling["skip_special_tokens"] is False
    assert "include_stop_str_in_output" not in p.sampling
    assert chat(include_stop_str_in_output=True).sampling["include_stop_str_in_output"] is True
    assert chat(allowed_token_ids=[7, 3]).sampling["allowed_token_ids"] == (7, 3)
    assert chat(truncate_prompt_tokens=9).sampling["truncate_prompt_tokens"] == 9
    assert chat(bad_words=["no", "never"]).sampling["bad_words"] == ("no", "never")
    assert "bad_words" not in chat(bad_words=[]).sampling
    assert "skip_special_tokens" not in chat(skip_special_tokens=True).sampling
    assert p.prompts == ({"messages": MSG},)


def test_unset_sampler_fields_are_left_to_the_models_generation_config():
    """The worker fills what the request leaves out (vLLM's --generation-config); what it sets,
    top_k -1 and 0 (no cut) included, goes as it is."""
    assert not {"temperature", "top_p", "top_k"} & set(chat().sampling)
    p = chat(temperature=0, top_p=0.5, top_k=0)
    assert (p.sampling["temperature"], p.sampling["top_p"], p.sampling["top_k"]) == (0.0, 0.5, None)
    assert chat(top_k=40).sampling["top_k"] == 40


def test_penalties_bias_and_vllm_extras_pass_through():
    p = chat(frequency_penalty=0.5, presence_penalty=-1, repetition_penalty=1.1, min_p=0.05,
             logit_bias={"5": 10, "2": -1.5}, stop_token_ids=[3])
    s = p.sampling
    assert (s["frequency_penalty"], s["presence_penalty"], s["repetition_penalty"], s["min_p"]) == (0.5, -1.0, 1.1, 0.05)
    assert s["logit_bias"] == [[2, -1.5], [5, 10.0]] and s["stop_token_ids"] == (3,)
    unset = chat().sampling
    assert not {"frequency_penalty", "presence_penalty", "repetition_penalty", "min_p", "logit_bias",
                "stop_token_ids"} & set(unset)
    c = parse_completion_request({"prompt": "a", "presence_penalty": 2, "logit_bias": {}}, **LIMITS)
    assert c.sampling["presence_penalty"] == 2.0 and "logit_bias" not in c.sampling


def test_response_format_and_structured_outputs_become_one_structured_spec():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).sampling["structured"]
    assert spec == {"kind": "json_schema", "spec": json.dumps(schema), "choices": [], "param": "response_format"}
    assert chat(response_format={"type": "json_object"}).sampling["structured"]["kind"] == "json_object"
    assert "structured" not in chat(response_format={"type": "text"}).sampling
    assert "structured" not in chat().sampling
    extra = {"json": json.dumps(schema), "regex": "[a-z]+", "choice": ["x", "y"], "grammar": 'root ::= "a"',
             "json_object": True}
    for key, value in extra.items():
        c = parse_completion_request({"prompt": "a", "structured_outputs": {key: value}}, **LIMITS)
        got = c.sampling["structured"]
        assert got["param"] == "structured_outputs" and got["kind"] == {"json": "json_schema"}.get(key, key)
        if key in ("json", "regex", "grammar"):
            assert got["spec"] == (json.dumps(schema) if key == "json" else value)
    assert parse_completion_request({"prompt": "a", "structured_outputs": {"choice": ["x"], "regex": None}},
                                    **LIMITS).sampling["structured"]["choices"] == ["x"]
    # vLLM's older guided_* fields
    assert chat(guided_choice=["x", "y"]).sampling["structured"] == {
        "kind": "choice", "spec": "", "choices": ["x", "y"], "param": "guided_choice"}
    assert chat(guided_json=schema).sampling["structured"]["spec"] == json.dumps(schema)
    assert chat(guided_regex="[ab]+").sampling["structured"]["kind"] == "regex"
    assert chat(guided_grammar='root ::= "a"').sampling["structured"]["kind"] == "grammar"


def test_chat_content_parts_are_joined():
    p = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}]}, **LIMITS)
    assert p.prompts[0]["messages"][0]["content"] == "ab"


@pytest.mark.parametrize("body, param", [
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 5}, "n"),
    ({"n": 0}, "n"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": ["a"] * 5}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "a"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": -0.1}, "min_p"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "a"}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "3"}, "stop_token_ids"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "whitespace": 1}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": [1]}}, "structured_outputs.json"),
    ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": 3}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "[1]"}, "guided_json"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_regex": "a", "guided_json": {}}, "guided_regex"),
])
def test_chat_bad_input_names_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": MSG, **body}, **LIMITS)
    assert e.value.status == 400
    assert e.value.param == param


def test_completion_prompt_forms():
    assert parse_completion_request({"prompt": "a"}, **LIMITS).prompts == ({"prompt": "a"},)
    assert parse_completion_request({"prompt": [1, 2]}, **LIMITS).prompts == ({"prompt_token_ids": [1, 2]},)
    assert len(parse_completion_request({"prompt": ["a", "b"]}, **LIMITS).prompts) == 2
    p = parse_completion_request({"prompt": "a", "logprobs": 3}, **LIMITS)
    assert p.max_tokens == 16 and p.sampling["logprobs"] == 3
    assert parse_completion_request({"prompt": "a", "echo": True}, **LIMITS).sampling["echo"] is True
    assert "echo" not in parse_completion_request({"prompt": "a", "echo": False}, **LIMITS).sampling
    assert parse_completion_request({"prompt": "a", "echo": True, "max_tokens": 0}, **LIMITS).max_tokens == 0


@pytest.mark.parametrize("body", [{}, {"prompt": 3}, {"prompt": []}, {"prompt": [1, "a"]}, {"prompt": "a", "echo": "yes"}, {"prompt": "a", "max_tokens": 0},
                                  {"prompt": ["a", "b", "c"], "n": 2}, {"prompt": "a", "logprobs": 30}])
def test_completion_bad_input(body):
    with pytest.raises(ApiError) as e:
        parse_completion_request(body, **LIMITS)
    assert e.value.status == 400


def test_chat_template_fields_reach_the_worker():
    p = chat(add_generation_prompt=False, continue_final_message=True, chat_template_kwargs={"enable_thinking": False})
    assert p.prompts[0]["chat_template_kwargs"] == {"enable_thinking": False, "add_generation_prompt": False,
                                                   "continue_final_message": True}
    assert "chat_template_kwargs" not in chat(add_generation_prompt=True).prompts[0]  # the defaults go unsaid


@pytest.mark.parametrize("body, param", [
    ({"chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"continue_final_message": True}, "continue_final_message"),  # needs add_generation_prompt false
    ({"add_generation_prompt": "no"}, "add_generation_prompt"),
])
def test_bad_chat_template_fields_name_the_field(body, param):
    with pytest.raises(ApiError) as e:
        chat(**body)
    assert e.value.status == 400 and e.value.param == param
