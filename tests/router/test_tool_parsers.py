import pytest

from services.router.tool_parsers import (
    Llama3JsonStream, MistralStream, StreamParser, parse_llama3_json, parse_mistral, parse_text,
)

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


def _pieces(parser, answer: str, size: int) -> tuple[str, list]:
    """Feed answer in pieces of size, then finish: (all content, all calls)."""
    content, calls = "", []
    for i in range(0, len(answer), size):
        c, k = parser.feed(answer[i:i + size])
        content, calls = content + c, calls + k
    rest, last = parser.finish()
    return content + rest, calls + last


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_llama3_json_streaming_holds_calls_to_the_end_and_passes_words_at_once(size):
    assert _pieces(Llama3JsonStream(), LLAMA_ANSWER, size) == ("", CALLS)
    words = Llama3JsonStream()
    assert words.feed(" <|py") == ("", [])  # may be the tag: wait
    assert words.feed("thon rocks") == (" <|python rocks", [])
    assert words.feed(" and {so} on") == (" and {so} on", []) and words.finish() == ("", [])
    broken = Llama3JsonStream()
    assert broken.feed('{"name": "now", ') == ("", []) and broken.finish() == ('{"name": "now", ', [])


MISTRAL_ARRAY = ('Let me look.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                 '{"name": "now", "arguments": {}}]')
MISTRAL_V11 = 'Let me look.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]now[ARGS]{}'


def test_mistral_calls_in_either_spelling_follow_the_tool_calls_token():
    """Mistral's two spellings: a JSON array after [TOOL_CALLS] (v0.3 tokenizers), or name[ARGS]{...}
    per call (v11+); what comes before is content; anything else after it is text, not calls."""
    assert parse_mistral(MISTRAL_ARRAY) == ("Let me look.", CALLS)
    assert parse_mistral(MISTRAL_V11) == ("Let me look.", CALLS)
    assert parse_mistral('[TOOL_CALLS]now[ARGS]{}') == (None, [("now", "{}")])
    for text in ("no calls [here]", "[TOOL_CALLS] not json", '[TOOL_CALLS][{"name": "now"', "[TOOL_CALLS]now{}",
                 '[TOOL_CALLS][{"name": "now", "arguments": {}}] and more', "[TOOL_CALLS][]",
                 "[TOOL_CALLS]now[ARGS][1]"):
        assert parse_mistral(text) == (text, [])


@pytest.mark.parametrize("answer", [MISTRAL_ARRAY, MISTRAL_V11])
@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_mistral_streaming_passes_words_and_holds_calls_to_the_end(answer, size):
    assert _pieces(MistralStream(), answer, size) == ("Let me look.", CALLS)
    words = MistralStream()
    assert words.feed("a [TOOL") == ("a ", [])  # may be the token: wait
    assert words.feed("S] b") == ("[TOOLS] b", []) and words.finish() == ("", [])
    cut = MistralStream()
    assert cut.feed('x[TOOL_CALLS][{"name": "now", ') == ("x", [])
    assert cut.finish() == ('[TOOL_CALLS][{"name": "now", ', [])  # cut short: text


def test_with_the_mistral_parser_calls_get_its_ids_and_special_tokens_stay_in_the_text():
    """Mistral's chat templates refuse tool call ids other than 9 letters and digits; its calls follow a
    special token, which the text keeps (skip_special_tokens false, as vLLM) when 'auto' may parse them."""
    import re

    from services.router.openai_format import ChoiceState, Formatter, apply_delta
    from services.router.protocol import parse_chat_request
    from services.runtime.wire import DeltaFrame

    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": [{"type": "function", "function": {
        "name": "get_weather"}}, {"type": "function", "function": {"name": "now"}}]}
    parsed = parse_chat_request(body, max_n=1, max_stop=4, tool_parser="mistral")
    assert parsed.sampling["skip_special_tokens"] is False and parsed.tools.short_ids
    choice = ChoiceState(0, 0)
    apply_delta(choice, DeltaFrame([1], MISTRAL_V11, 5, 1, "stop"))
    message = Formatter(parsed, "m").full_response([choice])["choices"][0]["message"]
    assert message["content"] == "Let me look." and len(message["tool_calls"]) == 2
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in message["tool_calls"])
    named = parse_chat_request({**body, "tool_choice": "required"}, max_n=1, max_stop=4, tool_parser="mistral")
    assert named.tools.short_ids and "skip_special_tokens" not in named.sampling  # constrained: no token to keep
    hermes = parse_chat_request(body, max_n=1, max_stop=4, tool_parser="hermes")
    assert not hermes.tools.short_ids and "skip_special_tokens" not in hermes.sampling
