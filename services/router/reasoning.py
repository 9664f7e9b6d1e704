"""Reasoning text apart from the answer (the router's --reasoning-parser), as vLLM returns it. Pure.

Models that think first write their reasoning inside `<think>...</think>`; the answer follows. The
reasoning goes out as `reasoning_content` (DeepSeek's field, which vLLM also uses), the rest as
`content`.
- `deepseek_r1`: the template opens the <think> block in the prompt, so the answer starts inside
  it: everything before `</think>` is reasoning (a leading `<think>` is dropped); without a
  `</think>` (cut short) all of it is.
- `qwen3`: reasoning only when the answer starts with `<think>` (thinking can be switched off with
  chat_template_kwargs {"enable_thinking": false}, and then there is none).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.text import held_back

OPEN, CLOSE = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def split_reasoning(parser: str, text: str) -> tuple[str | None, str]:
    """The whole answer -> (reasoning or None, content)."""
    stream = ReasoningStream(parser)
    reasoning, content = stream.feed(text)
    more_reasoning, more_content = stream.finish()
    reasoning += more_reasoning
    return (reasoning if stream.saw_reasoning else None), content + more_content


@dataclass(slots=True)
class ReasoningStream:
    """Feed the answer as it streams; get back (reasoning, content) increments. Text that may be
    the start of a tag is held back until it is known."""

    parser: str
    _state: str = "start"  # "start": the first characters decide; then "reasoning" or "content"
    _buffer: str = ""
    _after_close: bool = False  # the whitespace after </think> is not content
    saw_reasoning: bool = False

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning = ""
        if self._state == "start":
            head = self._buffer.lstrip()
            if head.startswith(OPEN):
                self._buffer, self._state, self.saw_reasoning = head[len(OPEN):], "reasoning", True
            elif OPEN.startswith(head):  # may still become <think>
                return "", ""
            elif self.parser == "deepseek_r1":
                self._state, self.saw_reasoning = "reasoning", True
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = self._buffer.find(CLOSE)
            if end < 0:
                cut = len(self._buffer) - held_back(self._buffer, (CLOSE,))
                reasoning, self._buffer = self._buffer[:cut], self._buffer[cut:]
                return reasoning, ""
            reasoning, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE):]
            self._state, self._after_close = "content", True
        content, self._buffer = self._buffer, ""
        if self._after_close:
            content = content.lstrip()
            self._after_close = not content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back once the answer has ended."""
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning" or (self._state == "start" and self.parser == "deepseek_r1" and rest):
            self.saw_reasoning = True
            return rest, ""
        return "", rest
