"""vLLM's bad_words: words a request never generates, as token sequences. Pure.

A word is banned as the model's tokenizer spells it on its own and after a space (mid-sentence
spelling), whichever of those differ. A one-token spelling bans that token at every step; a longer
one bans its last token when the output so far ends with the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def bad_word_ids(words: Sequence[str], encode: Callable[[str], list[int]]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of ``words`` (``encode`` without special tokens), each once."""
    spellings = {tuple(encode(text)) for word in words for text in (word.lstrip(), " " + word.lstrip())}
    return tuple(sorted(s for s in spellings if s))


def banned_next(spellings: tuple[tuple[int, ...], ...], output_ids: Sequence[int]) -> tuple[int, ...]:
    """Tokens the next step may not produce: each spelling's last token, where the output so far
    ends with the rest of that spelling."""
    banned = []
    for ids in spellings:
        prefix_len = len(ids) - 1
        if prefix_len == 0 or (len(output_ids) >= prefix_len
                               and tuple(output_ids[len(output_ids) - prefix_len:]) == ids[:-1]):
            banned.append(ids[-1])
    return tuple(banned)
