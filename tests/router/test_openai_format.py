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
