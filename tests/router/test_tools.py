import json

import pytest

from services.router.openai_format import ChoiceState, Formatter, apply_delta
from services.router.protocol import parse_chat_request
from services.router.tools import ToolMode
from services.runtime.errors import ApiError
from services.runtime.wire import DeltaFrame

LIMITS = {"max_n": 4, "max_stop": 4}
MSG = [{"role": "user", "content": "weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def chat(**body):
    return parse_chat_request({"messages": MSG, **body}, **LIMITS)


def test_a_named_tool_choice_constrains_the_answer_to_its_parameters():
    p = chat(tools=TOOLS, tool_choice=NAMED)
    assert p.tools.mode is ToolMode.NAMED and p.tools.name == "get_weather"
    assert p.sampling["structured"] == {"kind": "json_schema", "spec": json.dumps(WEATHER), "choices": [],
                                       "param": "tool_choice"}
    assert p.prompts == ({"messages": MSG, "tools": TOOLS},)  # the template renders them


def test_required_constrains_the_answer_to_an_array_of_calls_of_the_tools():
    schema = json.loads(chat(tools=TOOLS, tool_choice="required").sampling["structured"]["spec"])
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    items = schema["items"]["anyOf"]
    assert [i["properties"]["name"]["enum"] for i in items] == [["get_weather"], ["now"]]
    assert items[0]["properties"]["parameters"] == WEATHER and items[1]["properties"]["parameters"] == {"type": "object"}
    one = json.loads(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).sampling["structured"]["spec"])
    assert one["maxItems"] == 1


def test_no_tools_is_plain_chat_and_tool_choice_none_shows_the_tools_but_answers_in_text():
    for body in ({}, {"tools": []}, {"tool_choice": "none"}):
        p = chat(**body)
        assert p.tools is None and "structured" not in p.sampling and p.prompts == ({"messages": MSG},)
    p = chat(tools=TOOLS, tool_choice="none", response_format={"type": "json_object"})
    assert p.prompts == ({"messages": MSG, "tools": TOOLS},) and not p.tools.calls
    assert p.sampling["structured"]["param"] == "response_format"  # its own, not a tool's
    streamed, full = _run(chat(tools=TOOLS, tool_choice="none", stream=True), ["a", "b"], "stop")
    assert [c["delta"] for c in streamed] == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}]
    assert full["message"] == {"role": "assistant", "content": "ab"} and full["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS}, "tool_choice", "auto"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "required"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tools": "x", "tool_choice": "required"}, "tools", "list"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]", "function"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"},
     "tools[0].function.name", "letters"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}], "tool_choice": "required"},
     "tools[0].function.parameters", "schema"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools", "twice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "drop"),
    ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls", "boolean"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages[0].tool_calls", "list"),
])
def test_bad_tool_use_names_the_field(body, param, words):
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": MSG, **body}, **LIMITS)
    assert e.value.status == 400 and e.value.param == param and words in str(e.value)


def test_earlier_tool_calls_and_results_reach_the_template_with_arguments_as_objects():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*MSG, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    p = parse_chat_request({"messages": messages}, **LIMITS)
    got = p.prompts[0]["messages"]
    assert got[1] == {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert got[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def _frames(texts, finish):
    return [DeltaFrame([1], t, 5, i + 1, finish if i == len(texts) - 1 else None) for i, t in enumerate(texts)]


def _run(parsed, texts, finish):
    fmt, choice, chunks = Formatter(parsed, "m"), ChoiceState(0, 0), []
    for f in _frames(texts, finish):
        apply_delta(choice, f)
        chunks += fmt.delta_chunks(choice, f)
    return [c["choices"][0] for c in chunks], fmt.full_response([choice])["choices"][0]


def test_a_named_call_streams_its_arguments_and_answers_with_tool_calls():
    streamed, full = _run(chat(tools=TOOLS, tool_choice=NAMED, stream=True), ['{"city"', ': "Paris"}'], "stop")
    assert streamed[0]["delta"] == {"role": "assistant", "content": ""}
    first, second = streamed[1]["delta"]["tool_calls"][0], streamed[2]["delta"]["tool_calls"][0]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert second == {"index": 0, "function": {"arguments": ': "Paris"}'}}
    assert streamed[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    message = full["message"]
    assert message["content"] is None and full["finish_reason"] == "stop"
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]


def test_required_calls_go_out_whole_with_finish_reason_tool_calls():
    answer = '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    streamed, full = _run(chat(tools=TOOLS, tool_choice="required", stream=True), [answer[:20], answer[20:]], "stop")
    assert [c["delta"] for c in streamed[1:-1]] == [{"tool_calls": [
        {"index": 0, "id": streamed[1]["delta"]["tool_calls"][0]["id"], "type": "function",
         "function": {"name": "now", "arguments": "{}"}},
        {"index": 1, "id": streamed[1]["delta"]["tool_calls"][1]["id"], "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    assert streamed[-1]["finish_reason"] == "tool_calls" and full["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in full["message"]["tool_calls"]] == ["now", "get_weather"]


def test_calls_cut_short_by_max_tokens_come_back_as_text():
    streamed, full = _run(chat(tools=TOOLS, tool_choice="required", stream=True), ['[{"name": "no'], "length")
    assert streamed[1]["delta"] == {"content": '[{"name": "no'} and streamed[-1]["finish_reason"] == "length"
    assert full["message"] == {"role": "assistant", "content": '[{"name": "no'} and full["finish_reason"] == "length"


def test_auto_needs_a_tool_call_parser_and_then_finds_calls_in_the_text():
    p = parse_chat_request({"messages": MSG, "tools": TOOLS}, **LIMITS, tool_parser="hermes")
    assert p.tools.mode is ToolMode.AUTO and "structured" not in p.sampling
    answer = 'Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    streamed, full = _run(p, [answer[:15], answer[15:40], answer[40:]], "stop")
    deltas = [c["delta"] for c in streamed]
    assert deltas[1] == {"content": "Checking.\n"}
    call = deltas[2]["tool_calls"][0]
    assert call["index"] == 0 and call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert streamed[-1]["finish_reason"] == "tool_calls" and len(deltas) == 4
    assert full["message"]["content"] == "Checking." and full["finish_reason"] == "tool_calls"
    assert full["message"]["tool_calls"][0]["function"] == call["function"]
    streamed, full = _run(p, ["just ", "text <tool_"], "length")  # no call: all of it is text
    assert "".join(c["delta"].get("content", "") for c in streamed) == "just text <tool_"
    assert full["message"] == {"role": "assistant", "content": "just text <tool_"} and full["finish_reason"] == "length"


def test_auto_with_the_llama3_json_parser_finds_a_json_answers_calls():
    p = parse_chat_request({"messages": MSG, "tools": TOOLS}, **LIMITS, tool_parser="llama3_json")
    assert p.tool_parser == "llama3_json"
    answer = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "now", "parameters": {}}'
    streamed, full = _run(p, [" ", answer[:9], answer[9:30], answer[30:]], "stop")
    calls = [c["delta"]["tool_calls"][0] for c in streamed if "tool_calls" in c["delta"]]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (0, "get_weather", '{"city": "Oslo"}'), (1, "now", "{}")]
    assert not any(c["delta"].get("content") for c in streamed)  # nothing of the JSON leaks as text
    assert streamed[-1]["finish_reason"] == "tool_calls" and full["finish_reason"] == "tool_calls"
    assert full["message"]["content"] is None and len(full["message"]["tool_calls"]) == 2
    streamed, full = _run(p, ["It is ", "sunny."], "stop")  # an answer in words streams as it comes
    assert [c["delta"].get("content") for c in streamed[1:3]] == ["It is ", "sunny."]
    assert full["message"] == {"role": "assistant", "content": "It is sunny."} and full["finish_reason"] == "stop"
    streamed, full = _run(p, ['{"name": "get_', 'weather", "param'], "length")  # cut short: text
    assert "".join(c["delta"].get("content") or "" for c in streamed) == '{"name": "get_weather", "param'
    assert full["message"]["content"] == '{"name": "get_weather", "param'


def test_the_router_refuses_an_unknown_tool_call_parser():
    from services.router.config import RouterConfig

    with pytest.raises(ValueError, match="tool_call_parser"):
        RouterConfig(cluster_token="t", tool_call_parser="pythonic")


@pytest.mark.parametrize("command", ["router", "up"])
def test_vllms_enable_auto_tool_choice_is_accepted_with_a_parser_and_refused_without(command):
    """A vLLM command line (--enable-auto-tool-choice --tool-call-parser hermes) works as it is;
    the flag without a parser is refused, as vLLM does, naming what to add."""
    import argparse

    from services import launcher
    from services.router import cli

    module = cli if command == "router" else launcher
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    config = module.config_from_args(parser.parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]))
    assert config.tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        module.config_from_args(parser.parse_args(["--enable-auto-tool-choice"]))
