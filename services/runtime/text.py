"""Text helpers shared by the router and the worker. Pure."""

from __future__ import annotations


def held_back(text: str, strings: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of strings: what a
    stream must hold back until it knows whether one of them (a stop string, a tag) follows."""
    best = 0
    for s in strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
