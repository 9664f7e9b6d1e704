"""Tool calls the model chose to make, parsed out of its text (tool_choice "auto"). Pure.

`hermes`: calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes 2 Pro,
Qwen2.5 and kvmesh's embedded model write them so), as vLLM's parser of the same name. Streaming
holds back text that may be the start of a tag, sends each call whole once its closing tag has
come, and sends as text a call that does not parse or was cut short.

`llama3_json`: an answer that is tool calls is JSON objects `{"name": ..., "parameters": {...}}`
separated by `;`, possibly after `<|python_tag|>` (Llama 3.1-3.3 with their JSON tool template),
as vLLM's parser of the same name. An answer that starts otherwise is text, streamed at once; one
that starts like a call is held back to its end and sent as calls, or as text if it does not parse.

`mistral`: calls follow the `[TOOL_CALLS]` token, as a JSON array of `{"name", "arguments"}`
(Mistral 7B v0.3, Mixtral, NeMo) or as `name[ARGS]{...}` per call (newer tokenizers), as vLLM's
parser of the same name. Text before the token streams; from it on, all is held to the end and sent
as calls, or as text if it does not parse. The token is special: requests keep special tokens' text
(skip_special_tokens false, as vLLM), and call ids are 9 letters and digits, as Mistral's chat
templates require of the ids they are sent back with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from services.runtime.text import held_back

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
PYTHON_TAG = "<|python_tag|>"
TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"  # mistral
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


def check_auto_tool_choice(enabled: bool, parser: str | None) -> None:
    """vLLM's --enable-auto-tool-choice, accepted so its command lines work: it needs a parser to
    find the calls (as in vLLM); here the parser alone already allows tool_choice 'auto'."""
    if enabled and parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (which alone allows tool_choice "
                         f"'auto' here): one of {', '.join(TOOL_CALL_PARSERS)}")


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call's body, or None if it is not a call."""
    try:
        return _call_of(json.loads(body))
    except ValueError:
        return None


def _call_of(value) -> tuple[str, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def parse_text(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The whole answer -> (content, calls). Without a call that parses, all of it is content."""
    calls = [c for c in (_parse_call(m.group(1)) for m in _CALL.finditer(text)) if c is not None]
    if not calls:
        return text, []
    content = text[:text.index(OPEN)].strip()
    return content or None, calls


@dataclass(slots=True)
class StreamParser:
    """Feed the answer's text as it streams; get back text to send as content and whole calls."""

    _buffer: str = ""
    _in_call: bool = False
    num_calls: int = 0
    _after_call: bool = False

    def feed(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        self._buffer += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(CLOSE):]
                self._in_call = False
                call = _parse_call(body)
                if call is None:  # not a call after all: its text goes out as it was
                    content.append(self._content(OPEN + body + CLOSE))
                else:
                    calls.append(call)
                    self.num_calls += 1
                    self._after_call = True
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                content.append(self._content(self._buffer[:start]))
                self._buffer = self._buffer[start + len(OPEN):]
                self._in_call = True
                continue
            keep = held_back(self._buffer, (OPEN,))
            content.append(self._content(self._buffer[:len(self._buffer) - keep]))
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return "".join(content), calls

    def finish(self) -> tuple[str, list[tuple[str, str]]]:
        """What is left once the answer has ended: an unclosed call or a partial tag, as text."""
        rest = (OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return self._content(rest), []

    def _content(self, text: str) -> str:
        # Between and after calls only whitespace separates them: it is not content.
        return "" if self._after_call and not text.strip() else text


def parse_llama3_json(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The whole answer -> (None, calls) when it is calls, else (text, [])."""
    body = text.strip()
    body = body[len(PYTHON_TAG):].lstrip() if body.startswith(PYTHON_TAG) else body
    decoder, calls, i = json.JSONDecoder(), [], 0
    while body.startswith("{", i):
        try:
            value, i = decoder.raw_decode(body, i)
        except ValueError:
            return text, []
        call = _call_of(value)
        if call is None:
            return text, []
        calls.append(call)
        while i < len(body) and (body[i].isspace() or body[i] == ";"):
            i += 1
    return (None, calls) if calls and i == len(body) else (text, [])


@dataclass(slots=True)
class Llama3JsonStream:
    """StreamParser's interface for llama3_json: text goes out at once unless the answer starts like
    a call; then all of it waits for the end."""

    _buffer: str = ""
    _holding: bool | None = None  # None: the answer's start does not tell yet

    def feed(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        if self._holding is False:
            return text, []
        self._buffer += text
        start = self._buffer.lstrip()
        if not start or PYTHON_TAG.startswith(start):
            return "", []  # nothing yet, or what may be the start of the tag
        self._holding = start.startswith(("{", PYTHON_TAG))
        if self._holding:
            return "", []
        out, self._buffer = self._buffer, ""
        return out, []

    def finish(self) -> tuple[str, list[tuple[str, str]]]:
        text, self._buffer = self._buffer, ""
        content, calls = parse_llama3_json(text) if self._holding else (text, [])
        return content or "", calls


def parse_mistral(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The whole answer -> (content before [TOOL_CALLS], calls); without calls that parse, (text, [])."""
    start = text.find(TOOL_CALLS)
    calls = _mistral_calls(text[start:]) if start >= 0 else None
    if calls is None:
        return text, []
    return text[:start].strip() or None, calls


def _mistral_calls(text: str) -> list[tuple[str, str]] | None:
    """text: from the first [TOOL_CALLS] on; None unless all of it is calls."""
    decoder, calls = json.JSONDecoder(), []
    for segment in text.split(TOOL_CALLS)[1:]:
        body = segment.strip()
        if body.startswith("["):  # [{"name": ..., "arguments": {...}}, ...]
            try:
                value, end = decoder.raw_decode(body)
            except ValueError:
                return None
            found = [_call_of(v) for v in value] if isinstance(value, list) and value else [None]
            if body[end:].strip() or None in found:
                return None
            calls += found
            continue
        name, sep, arguments = body.partition(ARGS)  # name[ARGS]{...}
        arguments = arguments.strip()
        try:
            value, end = decoder.raw_decode(arguments)
        except ValueError:
            return None
        if not sep or not name.strip() or not isinstance(value, dict) or arguments[end:].strip():
            return None
        calls.append((name.strip(), arguments[:end]))
    return calls or None


@dataclass(slots=True)
class MistralStream:
    """StreamParser's interface for mistral: text goes out until [TOOL_CALLS]; the rest waits for the end."""

    _buffer: str = ""
    _calls: bool = False

    def feed(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        self._buffer += text
        if self._calls:
            return "", []
        start = self._buffer.find(TOOL_CALLS)
        if start >= 0:
            out, self._buffer, self._calls = self._buffer[:start], self._buffer[start:], True
            return out, []
        keep = held_back(self._buffer, (TOOL_CALLS,))
        out, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        return out, []

    def finish(self) -> tuple[str, list[tuple[str, str]]]:
        text, self._buffer = self._buffer, ""
        calls = _mistral_calls(text) if self._calls else None
        return ("", calls) if calls is not None else (text, [])


ToolStream = StreamParser | Llama3JsonStream | MistralStream


def stream_parser(parser: str) -> ToolStream:
    return {"llama3_json": Llama3JsonStream, "mistral": MistralStream}.get(parser, StreamParser)()


def parse_answer(parser: str, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """``parse_text`` of the named parser."""
    return {"llama3_json": parse_llama3_json, "mistral": parse_mistral}.get(parser, parse_text)(text)
