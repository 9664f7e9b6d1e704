"""OpenAI's Responses API (/v1/responses): the request as chat, the answer as a `response` object
or its stream of events. Router + worker apps in one process, FakeEngine behind the worker."""

import json

import pytest

from services.router.responses_request import chat_body
from services.runtime.errors import ApiError
from tests.router.stack import read_sse, running_stack


def test_a_conversation_of_items_becomes_chat_messages():
    chat, echo, _ = chat_body({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0, "metadata": {"k": "v"},
        "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{\"d\":1}"},
            {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{\"d\":2}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sun"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        ],
        "tools": [{"type": "function", "name": "get", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "get"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
    })
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"d\":1}"}},
            {"id": "c2", "type": "function", "function": {"name": "get", "arguments": "{\"d\":2}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sun"}, {"role": "assistant", "content": "Sunny."}]
    assert chat["tools"] == [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get"}}
    schema = {"name": "w", "schema": {"type": "object"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": schema}
    assert (chat["max_completion_tokens"], chat["temperature"], chat["model"]) == (9, 0, "m")
    assert (echo.instructions, echo.max_output_tokens, echo.metadata) == ("Be brief.", 9, {"k": "v"})


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": [{"type": "input_image"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input[0].content"),
    ({"input": []}, "input"), ({}, "input"), ({"input": "x", "include": ["file_search_call.results"]}, "include"),
])
def test_what_is_not_served_is_refused_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        chat_body(body)
    assert e.value.param == param


async def test_a_response_object_and_its_stream_of_events():
    async with running_stack() as s:
        body = {"model": "fake", "input": "hi", "max_output_tokens": 5, "metadata": {"run": "1"}}
        resp = await s.post("/v1/responses", body)
        got = await resp.json()
        assert resp.status == 200, got
        assert (got["object"], got["status"], got["incomplete_details"]) == ("response", "incomplete",
                                                                           {"reason": "max_output_tokens"})
        (message,) = got["output"]
        assert message["type"] == "message" and message["content"][0]["text"] == "abcde"
        assert got["usage"]["output_tokens"] == 5 and got["usage"]["input_tokens"] == len("user:hi\n")
        assert got["id"].startswith("resp_") and got["metadata"] == {"run": "1"}

        resp = await s.post("/v1/responses", {**body, "stream": True})
        raw = (await resp.read()).decode()
        events = [json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: ")]
        names = [line[len("event: "):] for line in raw.splitlines() if line.startswith("event: ")]
        assert names == [e["type"] for e in events]
        assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]
        assert names[-4:] == ["response.output_text.done", "response.content_part.done",
                              "response.output_item.done", "response.incomplete"]
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "abcde"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == "abcde"
        await s.wait_blocks_free()


async def test_an_error_mid_stream_is_one_error_event():
    async with running_stack() as s:
        body = {"input": "FAIL", "max_output_tokens": 9, "stream": True}
        events = await read_sse(await s.post("/v1/responses", body))
        assert events[-1]["type"] == "error" and "boom" in events[-1]["message"]
        resp = await s.post("/v1/responses", {"input": "x", "previous_response_id": "resp_1"})
        assert resp.status == 404 and (await resp.json())["error"]["param"] == "previous_response_id"
        resp = await s.post("/v1/responses", {"input": "x", "max_output_tokens": 2})  # and it still answers
        assert resp.status == 200 and (await resp.json())["status"] == "incomplete"
        await s.wait_blocks_free()


def test_text_then_a_call_stream_as_a_message_item_then_a_function_call_item():
    """tool_choice 'auto' (hermes): the words before the call are one message item, the call its own
    function_call item; the final response holds both, in that order."""
    from services.router.openai_format import ChoiceState, apply_delta
    from services.router.protocol import parse_chat_request
    from services.router.responses_format import ResponsesFormatter
    from services.runtime.wire import DeltaFrame

    body = {"input": "weather?", "tools": [{"type": "function", "name": "now"}], "stream": True}
    chat, echo, _ = chat_body(body)
    fmt = ResponsesFormatter(parse_chat_request(chat, max_n=1, max_stop=4, tool_parser="hermes"), "m", echo)
    answer = 'Checking. <tool_call>{"name": "now", "arguments": {}}</tool_call>'
    choice, raw = ChoiceState(0, 0), fmt.stream_head()
    for i, piece in enumerate([answer[:12], answer[12:30], answer[30:]]):
        frame = DeltaFrame([1], piece, 3, i + 1, "stop" if i == 2 else None)
        apply_delta(choice, frame)
        raw += fmt.stream_chunks(choice, frame)
    raw += fmt.stream_tail([choice])
    events = [json.loads(line[len("data: "):]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["message", "function_call"]
    final = events[-1]
    assert final["type"] == "response.completed"
    message, call = final["response"]["output"]
    assert message["content"][0]["text"] == "Checking. " and (call["name"], call["arguments"]) == ("now", "{}")
    assert fmt.full_response([choice])["output"][1]["name"] == "now"  # the whole response says the same


def test_reasoning_streams_as_its_own_item_before_the_answer():
    """--reasoning-parser deepseek_r1: the think block is a reasoning item (reasoning_text deltas),
    the answer a message item after it; the whole response holds the same two items."""
    from services.router.openai_format import ChoiceState, apply_delta
    from services.router.protocol import parse_chat_request
    from services.router.responses_format import ResponsesFormatter
    from services.runtime.wire import DeltaFrame

    chat, echo, _ = chat_body({"input": "2+2?", "stream": True})
    fmt = ResponsesFormatter(parse_chat_request(chat, max_n=1, max_stop=4, reasoning_parser="deepseek_r1"), "m", echo)
    choice, raw = ChoiceState(0, 0), b""
    for i, piece in enumerate(["Add ", "them.</think>", "It is ", "4."]):
        frame = DeltaFrame([1], piece, 3, i + 1, "stop" if i == 3 else None)
        apply_delta(choice, frame)
        raw += fmt.stream_chunks(choice, frame)
    raw += fmt.stream_tail([choice])
    events = [json.loads(line[len("data: "):]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "Add them."
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "It is 4."
    reasoning, message = events[-1]["response"]["output"]
    assert (reasoning["type"], reasoning["content"][0]["text"]) == ("reasoning", "Add them.")
    assert message["content"][0]["text"] == "It is 4."
    whole = fmt.full_response([choice])["output"]
    assert [o["type"] for o in whole] == ["reasoning", "message"] and whole[1]["content"][0]["text"] == "It is 4."


async def test_stored_responses_continue_a_conversation_and_can_be_read_and_deleted():
    """store (default true): GET /v1/responses/{id} returns the response; previous_response_id
    sends the stored conversation (input and output, not the instructions) before the new input."""
    async with running_stack() as s:
        first = await (await s.post("/v1/responses", {"input": "hi", "instructions": "Be brief.",
                                                      "max_output_tokens": 3})).json()
        assert first["store"] is True and first["previous_response_id"] is None
        got = await s.client.get(s.url(f"/v1/responses/{first['id']}"))
        assert got.status == 200 and await got.json() == first

        body = {"input": [{"role": "user", "content": "again"}], "previous_response_id": first["id"],
                "max_output_tokens": 2, "stream": True}
        events = await read_sse(await s.post("/v1/responses", body))
        second = events[-1]["response"]
        assert second["previous_response_id"] == first["id"]
        sent = s.engines[0].requests[-1].messages
        assert [(m["role"], m["content"]) for m in sent] == [("user", "hi"), ("assistant", "abc"), ("user", "again")]

        third = await (await s.post("/v1/responses", {"input": "more", "previous_response_id": second["id"],
                                                      "max_output_tokens": 1, "store": False})).json()
        assert third["store"] is False
        sent = s.engines[0].requests[-1].messages
        assert [m["content"] for m in sent] == ["hi", "abc", "again", "ab", "more"]
        assert (await s.client.get(s.url(f"/v1/responses/{third['id']}"))).status == 404

        deleted = await s.client.delete(s.url(f"/v1/responses/{first['id']}"))
        assert await deleted.json() == {"id": first["id"], "object": "response", "deleted": True}
        assert (await s.client.get(s.url(f"/v1/responses/{first['id']}"))).status == 404
        assert (await s.client.delete(s.url(f"/v1/responses/{first['id']}"))).status == 404
        resp = await s.post("/v1/responses", {"input": "x", "previous_response_id": first["id"]})
        assert resp.status == 404 and "not found" in (await resp.json())["error"]["message"]
        await s.wait_blocks_free()


async def test_a_router_that_keeps_no_responses_says_so():
    async with running_stack(responses_store_size=0) as s:
        first = await (await s.post("/v1/responses", {"input": "hi", "max_output_tokens": 2})).json()
        assert first["store"] is False
        resp = await s.post("/v1/responses", {"input": "x", "previous_response_id": first["id"]})
        assert resp.status == 404 and "--responses-store-size" in (await resp.json())["error"]["message"]
        await s.wait_blocks_free()


def test_the_store_keeps_the_newest_and_the_ones_in_use():
    from services.router.responses_store import ResponseStore, output_messages

    store = ResponseStore(2)
    for i in range(3):
        store.put({"id": f"r{i}"}, [])
        if i == 1:
            assert store.get("r0") is not None  # r0 in use: r1 becomes the oldest
    assert store.get("r1") is None and store.get("r0") is not None and len(store) == 2
    output = [{"type": "reasoning", "content": []},
              {"type": "message", "content": [{"type": "output_text", "text": "Let me check."}]},
              {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
              {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"}]
    assert output_messages(output) == [{"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}]
