import pytest

from services.router.reasoning import ReasoningStream, split_reasoning

THOUGHT = "<think>\nThe user wants a number. 2 < 3 </thin is not a tag.\n</think>\n\nThe answer is 3."


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_reasoning_splits_from_the_answer(parser):
    assert split_reasoning(parser, THOUGHT) == ("\nThe user wants a number. 2 < 3 </thin is not a tag.\n",
                                                "The answer is 3.")


def test_deepseek_r1_starts_inside_the_think_block_and_qwen3_only_with_its_tag():
    text = "pondering...</think>Done."
    assert split_reasoning("deepseek_r1", text) == ("pondering...", "Done.")
    assert split_reasoning("qwen3", text) == (None, text)
    assert split_reasoning("deepseek_r1", "still thinking") == ("still thinking", "")  # cut short
    assert split_reasoning("qwen3", "<think>still thinking") == ("still thinking", "")
    assert split_reasoning("qwen3", "No thoughts, just this.") == (None, "No thoughts, just this.")


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 9, 1000])
def test_streaming_in_any_pieces_gives_the_same_split_and_no_tag(parser, size):
    stream, reasoning, content = ReasoningStream(parser), [], []
    for i in range(0, len(THOUGHT), size):
        r, c = stream.feed(THOUGHT[i:i + size])
        reasoning.append(r)
        content.append(c)
    r, c = stream.finish()
    assert ("".join(reasoning) + r, "".join(content) + c) == split_reasoning(parser, THOUGHT)
    assert all("<think>" not in piece and "</think>" not in piece for piece in reasoning + content)


def _chat(body, parser="deepseek_r1", tool_parser=None):
    from services.router.protocol import parse_chat_request

    return parse_chat_request({"messages": [{"role": "user", "content": "x"}], **body}, max_n=4, max_stop=4,
                              tool_parser=tool_parser, reasoning_parser=parser)


def _run(parsed, texts):
    from services.router.openai_format import ChoiceState, Formatter, apply_delta
    from services.runtime.wire import DeltaFrame

    fmt, choice, chunks = Formatter(parsed, "m"), ChoiceState(0, 0), []
    for i, text in enumerate(texts):
        frame = DeltaFrame([1], text, 5, i + 1, "stop" if i == len(texts) - 1 else None)
        apply_delta(choice, frame)
        chunks += fmt.delta_chunks(choice, frame)
    return [c["choices"][0]["delta"] for c in chunks], fmt.full_response([choice])["choices"][0]


def test_chat_answers_carry_reasoning_content_apart_from_content():
    deltas, full = _run(_chat({"stream": True}), ["Let me see</thi", "nk>\n\nIt is", " 3."])
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me see"
    assert "".join(d.get("content", "") for d in deltas) == "It is 3."
    assert full["message"] == {"role": "assistant", "content": "It is 3.", "reasoning_content": "Let me see"}
    _, plain = _run(_chat({}, parser="qwen3"), ["No thinking here."])
    assert plain["message"] == {"role": "assistant", "content": "No thinking here."}


def test_reasoning_then_a_tool_call_with_tool_choice_auto():
    tools = [{"type": "function", "function": {"name": "now"}}]
    text = '<think>I need the time.</think><tool_call>{"name": "now", "arguments": {}}</tool_call>'
    deltas, full = _run(_chat({"tools": tools, "stream": True}, parser="qwen3", tool_parser="hermes"),
                        [text[:20], text[20:50], text[50:]])
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "I need the time."
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == ["now"]
    assert full["message"]["reasoning_content"] == "I need the time." and full["finish_reason"] == "tool_calls"


def test_structured_outputs_wait_for_the_reasoning_to_end():
    p = _chat({"response_format": {"type": "json_object"}})
    assert p.sampling["structured"]["reasoning_start"] == "<think>"
    assert p.sampling["structured"]["reasoning_end"] == "</think>"
    tools = [{"type": "function", "function": {"name": "now"}}]
    p = _chat({"tools": tools, "tool_choice": "required", "stream": True})
    assert p.sampling["structured"]["reasoning_end"] == "</think>"
    answer = 'Time?</think>[{"name": "now", "parameters": {}}]'
    deltas, full = _run(p, [answer[:12], answer[12:]])
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Time?"
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == ["now"]
    assert full["finish_reason"] == "tool_calls" and full["message"]["reasoning_content"] == "Time?"
    assert "structured" not in _chat({}).sampling
