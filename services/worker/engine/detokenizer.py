"""Incremental detokenization with stop strings.

Text increments never split a UTF-8 character (a trailing U+FFFD means an incomplete byte
sequence: wait for more tokens), text that could be the start of a stop string is held back
until it is known not to be one, and the concatenation of all increments equals the tokenizer's
decode of all generated ids (cut before a matched stop string, or right after it with include_stop)."""

from __future__ import annotations

from collections.abc import Callable

from services.runtime.text import held_back


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...], include_stop: bool = False):
        self._decode = decode
        self._stop = stop
        self._include_stop = include_stop  # vLLM's include_stop_str_in_output: the text ends with the stop string
        self._text = ""  # decoded text of all ids, complete characters only
        self._sent = 0  # characters of _text already returned
        self._offset = 0  # ids before this index are fully reflected in _text
        self._prefix_text = ""  # decode(ids[_offset:read]) at the last flush point
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def step(self, token_ids: list[int], final: bool) -> str:
        """token_ids: all generated ids so far. Returns the new text to send."""
        new_text = self._decode(token_ids[self._offset :])
        if final or not new_text.endswith("\ufffd"):
            if new_text.startswith(self._prefix_text):
                self._text += new_text[len(self._prefix_text) :]
            else:  # decode is not prefix-stable here: fall back to a full decode
                self._text = self._decode(token_ids)
            # Keep a few ids of context so merges across the boundary decode the same.
            self._offset = max(0, len(token_ids) - 4)
            self._prefix_text = self._decode(token_ids[self._offset :])
        return self._emit(final)

    def _emit(self, final: bool) -> str:
        text = self._text
        if self._stop:
            search_from = max(0, self._sent - max(len(s) for s in self._stop))
            # (where, -length): the earliest match, the longest of those that start there
            hits = [(i, -len(s)) for i, s in ((text.find(s, search_from), s) for s in self._stop) if i >= 0]
            if hits:
                start, minus_length = min(hits)
                self.matched = text[start:start - minus_length]
                end = start - minus_length if self._include_stop else start
                out = text[self._sent : end] if end > self._sent else ""
                self._sent = max(self._sent, end)
                return out
            if not final:
                text = text[: len(text) - held_back(text, self._stop)]
        out = text[self._sent :] if len(text) > self._sent else ""
        self._sent = max(self._sent, len(text))
        return out

