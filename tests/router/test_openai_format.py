from services.router.openai_format import ChoiceState, Formatter, apply_delta, usage
from services.router.protocol import parse_chat_request, parse_completion_request
from services.runtime.wire import DeltaFrame

LIMITS = {"max_n": 4, "max_stop": 4}


def frame(text, n, finish=None, logprobs=None):
    return DeltaFrame([1], text, 5, n, finish, logprobs)


def test_chat_stream_chunks_role_first_then_content_then_finish():
    parsed = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "stream": True,
                                 "stream_options": {"include_usage": True}}, **LIMITS)
    fmt = Formatter(parsed, "m")
    choice = ChoiceState(index=0, prompt_index=0)
    f1 = frame("he", 1)
    apply_delta(choice, f1)
    chunks = fmt.delta_chunks(choice, f1)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "he"}
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    f2 = frame("y", 2, "stop")
    apply_delta(choice, f2)
    chunks = fmt.delta_chunks(choice, f2)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    final = fmt.usage_chunk([choice])
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                                                       "prompt_tokens_details": {"cached_tokens": 0}}


def test_prompt_counted_once_for_n_choices():
    a = ChoiceState(0, 0, num_prompt_tokens=5, num_generated_tokens=3, num_cached_tokens=0)
    b = ChoiceState(1, 0, num_prompt_tokens=5, num_generated_tokens=4, num_cached_tokens=0)
    assert usage([a, b]) == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_cached_prompt_tokens_reported_in_usage_details():
    first = ChoiceState(0, 0, num_prompt_tokens=40, num_generated_tokens=3, num_cached_tokens=32)
    second = ChoiceState(1, 1, num_prompt_tokens=20, num_generated_tokens=3, num_cached_tokens=16)
    assert usage([first, second])["prompt_tokens_details"] == {"cached_tokens": 48}


def test_completion_full_response_with_logprobs():
    parsed = parse_completion_request({"prompt": "x", "logprobs": 1}, **LIMITS)
    fmt = Formatter(parsed, "m")
    choice = ChoiceState(0, 0)
    apply_delta(choice, frame("ab", 1, logprobs=[[1, "ab", -0.1, [[1, "ab", -0.1]]]]))
    apply_delta(choice, frame("c", 2, "length", logprobs=[[2, "c", -0.2, [[2, "c", -0.2]]]]))
    body = fmt.full_response([choice])
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    c = body["choices"][0]
    assert c["text"] == "abc" and c["finish_reason"] == "length"
    assert c["logprobs"] == {"tokens": ["ab", "c"], "token_logprobs": [-0.1, -0.2],
                             "top_logprobs": [{"ab": -0.1}, {"c": -0.2}], "text_offset": [0, 2]}


def _stream(parsed, frames):
    fmt, choice, chunks = Formatter(parsed, "m"), ChoiceState(0, 0), []
    for f in frames:
        apply_delta(choice, f)
        chunks += fmt.delta_chunks(choice, f)
    return chunks


def test_streamed_token_ids_survive_text_held_back_for_a_tool_call():
    """return_token_ids, streaming: every generated id reaches some chunk, in order, also the ids of
    text the tool-call parser held back; the prompt's ids go out once, on the first chunk."""
    tools = [{"type": "function", "function": {"name": "now"}}]
    parsed = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "stream": True, "tools": tools,
                                 "return_token_ids": True}, **LIMITS, tool_parser="hermes")
    texts = ["Hi ", "<tool_", 'call>{"name": "now", "arguments": {}}', "</tool_call>"]
    frames = [DeltaFrame([10 + i, 20 + i], t, 5, 2 * (i + 1), "stop" if i == 3 else None,
                         prompt_token_ids=[7, 8, 9] if i == 0 else None) for i, t in enumerate(texts)]
    chunks = _stream(parsed, frames)
    assert chunks[0]["prompt_token_ids"] == [7, 8, 9] and all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == [10, 20, 11, 21, 12, 22, 13, 23]
    call = next(c for c in chunks if "tool_calls" in c["choices"][0]["delta"])
    assert call["choices"][0]["token_ids"] == [11, 21, 12, 22, 13, 23]  # the held-back text's ids go with the call


def test_prompt_logprobs_render_as_vllm_with_the_prompt_token_first():
    parsed = parse_completion_request({"prompt": "ab", "prompt_logprobs": 1, "return_token_ids": True}, **LIMITS)
    scored = [[5, "a", None, None, []], [6, "b", -2.5, 3, [[9, "z", -0.1]]], [7, "c", float("-inf"), 2, [[7, "c", -0.5]]]]
    choice = ChoiceState(0, 0)
    apply_delta(choice, DeltaFrame([1], "x", 3, 1, "length", prompt_token_ids=[5, 6, 7], prompt_logprobs=scored))
    got = Formatter(parsed, "m").full_response([choice])["choices"][0]
    assert got["prompt_logprobs"] == [
        None,
        {"6": {"logprob": -2.5, "rank": 3, "decoded_token": "b"}, "9": {"logprob": -0.1, "rank": 1, "decoded_token": "z"}},
        {"7": {"logprob": -9999.0, "rank": 2, "decoded_token": "c"}},  # JSON has no -inf: vLLM's floor
    ]
    assert (got["prompt_token_ids"], got["token_ids"]) == ([5, 6, 7], [1])
    assert list(got["prompt_logprobs"][1]) == ["6", "9"]  # the prompt's own token first


def _tokens_as_ids_request(chat: bool, **extra):
    body = {"logprobs": True, "top_logprobs": 2, **extra} if chat else {"prompt": "x", "logprobs": 2, **extra}
    if chat:
        return parse_chat_request({"messages": [{"role": "user", "content": "x"}], **body}, **LIMITS)
    return parse_completion_request(body, **LIMITS)


# A character split over two byte-fallback tokens: neither piece is valid UTF-8 alone.
SPLIT = [[[300, "\ufffd", -0.5, [[300, "\ufffd", -0.5], [7, "a", -1.5]]]],
         [[301, "é", -0.25, [[301, "é", -0.25], [8, "b", -2.0]]]]]


def test_return_tokens_as_token_ids_names_sampled_and_top_tokens_by_id():
    parsed = _tokens_as_ids_request(chat=True, return_tokens_as_token_ids=True)
    fmt, choice = Formatter(parsed, "m"), ChoiceState(0, 0)
    for i, lp in enumerate(SPLIT):
        apply_delta(choice, frame(lp[0][1], i + 1, "length" if i else None, logprobs=lp))
    content = fmt.full_response([choice])["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["token_id:300", "token_id:301"]
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == [["token_id:300", "token_id:7"],
                                                                          ["token_id:301", "token_id:8"]]
    assert content[0]["bytes"] == list(b"token_id:300") and content[1]["logprob"] == -0.25
    plain = Formatter(_tokens_as_ids_request(chat=True), "m").full_response([choice])["choices"][0]
    assert [c["token"] for c in plain["logprobs"]["content"]] == ["\ufffd", "é"]  # off by default


def test_return_tokens_as_token_ids_in_completions_keeps_text_offsets():
    parsed = _tokens_as_ids_request(chat=False, return_tokens_as_token_ids=True)
    fmt, choice = Formatter(parsed, "m"), ChoiceState(0, 0)
    for i, lp in enumerate(SPLIT):
        apply_delta(choice, frame(lp[0][1], i + 1, "length" if i else None, logprobs=lp))
    lp = fmt.full_response([choice])["choices"][0]["logprobs"]
    assert lp["tokens"] == ["token_id:300", "token_id:301"]
    assert lp["top_logprobs"] == [{"token_id:300": -0.5, "token_id:7": -1.5}, {"token_id:301": -0.25, "token_id:8": -2.0}]
    assert lp["text_offset"] == [0, 1]  # offsets still count the text's characters


def test_return_tokens_as_token_ids_must_be_a_boolean():
    import pytest

    from services.runtime.errors import ApiError

    with pytest.raises(ApiError, match="return_tokens_as_token_ids"):
        _tokens_as_ids_request(chat=False, return_tokens_as_token_ids="yes")


def test_the_routers_flag_names_tokens_by_id_for_every_request():
    from services.router.config import RouterConfig
    from services.router.openai_api import _server_defaults

    parsed = _tokens_as_ids_request(chat=False)
    assert not _server_defaults(parsed, RouterConfig(cluster_token="t")).tokens_as_ids
    on = RouterConfig(cluster_token="t", return_tokens_as_token_ids=True)
    assert _server_defaults(parsed, on).tokens_as_ids
    # as vLLM: the flag wins over a request's false
    assert _server_defaults(_tokens_as_ids_request(chat=False, return_tokens_as_token_ids=False), on).tokens_as_ids
