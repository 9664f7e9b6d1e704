import pytest

from services.router.tool_parsers import Llama3JsonStream, StreamParser, parse_llama3_json, parse_text

ANSWER = ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
          '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
CALLS = [("get_weather", '{"city": "Oslo"}'), ("now", "{}")]


def test_whole_answer_splits_into_content_and_calls():
    assert parse_text(ANSWER) == ("Let me look.", CALLS)
    assert parse_text('<tool_call>{"name": "now", "arguments": "{}"}</tool_call>') == (None, [("now", "{}")])
    for text in ("no calls here", "<tool_call>not json</tool_call>", '<tool_call>{"name": "now"', "<tool_call"):
        assert parse_text(text) == (text, [])


def _stream(text: str, sizes: list[int]) -> tuple[str, list]:
    parser, content, calls, i = StreamParser(), [], [], 0
    for n in sizes:
        c, k = parser.feed(text[i:i + n])
        content.append(c)
        calls += k
        i += n
    content.append(parser.feed(text[i:])[0])
    rest, last = parser.finish()
    return "".join(content) + rest, calls + last


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11, 1000])
def test_streaming_in_any_pieces_gives_the_same_calls_and_never_leaks_a_tag(size):
    content, calls = _stream(ANSWER, [size] * (len(ANSWER) // size + 1))
    assert calls == CALLS and content == "Let me look.\n"


def test_a_partial_tag_is_held_back_until_it_is_known_not_to_be_one():
    parser = StreamParser()
    assert parser.feed("a <tool_") == ("a ", [])
    assert parser.feed("box>") == ("<tool_box>", [])
    assert parser.finish() == ("", [])


@pytest.mark.parametrize("text", ["x <tool_call>{\"name\": \"now\", \"argu", "x <tool_ca", "<tool_call>oops</tool_call>"])
def test_a_call_cut_short_or_unparsable_comes_back_as_text(text):
    assert _stream(text, [3] * 20) == (text, [])


LLAMA_ANSWER = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "now", "arguments": {}}'


def test_llama3_json_answers_are_calls_only_when_all_of_them_parse():
    assert parse_llama3_json(LLAMA_ANSWER) == (None, CALLS)
    assert parse_llama3_json(' {"name": "now", "parameters": {}}\n') == (None, [("now", "{}")])
    for text in ("The weather is fine.", '{"name": "now"', '{"city": "Oslo"}', '{"name": "now"} and more',
                 "Call {\"name\": \"now\"} maybe", "<|python_tag|>print(1)", ""):
        assert parse_llama3_json(text) == (text, [])


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_llama3_json_streaming_holds_calls_to_the_end_and_passes_words_at_once(size):
    parser, content, calls = Llama3JsonStream(), "", []
    for i in range(0, len(LLAMA_ANSWER), size):
        c, k = parser.feed(LLAMA_ANSWER[i:i + size])
        content, calls = content + c, calls + k
    rest, last = parser.finish()
    assert (content + rest, calls + last) == ("", CALLS)
    words = Llama3JsonStream()
    assert words.feed(" <|py") == ("", [])  # may be the tag: wait
    assert words.feed("thon rocks") == (" <|python rocks", [])
    assert words.feed(" and {so} on") == (" and {so} on", []) and words.finish() == ("", [])
    broken = Llama3JsonStream()
    assert broken.feed('{"name": "now", ') == ("", []) and broken.finish() == ('{"name": "now", ', [])
