"""Prompts of a given token count. kvmesh (and vLLM) accept a list of token ids as the
/v1/completions prompt, which makes the count exact; other servers get text whose length is
calibrated once against the server's own usage.prompt_tokens."""

from __future__ import annotations

import enum
import random

import aiohttp

TOKEN_ID_RANGE = (1000, 20000)  # inside any modern vocabulary, clear of the usual special ids
WORDS = ("memory cluster attention block cache token server router worker request stream latency "
         "context window layer head batch queue model prefill decode transfer page spill").split()


class PromptFormat(enum.Enum):
    AUTO = "auto"
    TOKENS = "tokens"
    TEXT = "text"


class PromptBuilder:
    def __init__(self, fmt: PromptFormat, words_per_token: float = 1.0, seed: int = 0, shared_prefix_len: int = 0):
        """shared_prefix_len: every prompt starts with the same this many tokens (a shared system
        prompt or document, what prefix caching serves); the rest differs from prompt to prompt."""
        if fmt is PromptFormat.AUTO:
            raise ValueError("resolve PromptFormat.AUTO with detect() first")
        self.format = fmt
        self.words_per_token = words_per_token
        self.seed = seed
        self.shared_prefix_len = shared_prefix_len

    def build(self, index: int, num_tokens: int) -> list[int] | str:
        shared = min(self.shared_prefix_len, num_tokens)
        head = random.Random(self.seed * 7_919 - 1)  # the same for every prompt
        rng = random.Random(self.seed * 7_919 + index)  # distinct prompts: no accidental prefix sharing
        if self.format is PromptFormat.TOKENS:
            return ([head.randrange(*TOKEN_ID_RANGE) for _ in range(shared)]
                    + [rng.randrange(*TOKEN_ID_RANGE) for _ in range(num_tokens - shared)])
        num_shared = round(shared * self.words_per_token)
        num_words = max(1, round(num_tokens * self.words_per_token))
        words = [head.choice(WORDS) for _ in range(num_shared)] + [rng.choice(WORDS) for _ in range(num_words - num_shared)]
        return " ".join(words)


async def _probe(session: aiohttp.ClientSession, base: str, model: str, prompt) -> dict | None:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    async with session.post(base + "/completions", json=body) as resp:
        payload = await resp.json(content_type=None)
        return payload if resp.status == 200 else None


async def detect(session: aiohttp.ClientSession, base: str, model: str, fmt: PromptFormat,
                 seed: int = 0, shared_prefix_len: int = 0) -> PromptBuilder:
    """Token-id prompts when asked or when the server takes them; else text calibrated on usage."""
    if fmt in (PromptFormat.AUTO, PromptFormat.TOKENS):
        if fmt is PromptFormat.TOKENS or await _probe(session, base, model, list(range(1000, 1008))):
            return PromptBuilder(PromptFormat.TOKENS, seed=seed, shared_prefix_len=shared_prefix_len)
    num_words = 200
    sample = PromptBuilder(PromptFormat.TEXT, 1.0, seed).build(0, num_words)
    payload = await _probe(session, base, model, sample)
    num_tokens = ((payload or {}).get("usage") or {}).get("prompt_tokens") or num_words
    return PromptBuilder(PromptFormat.TEXT, num_words / num_tokens, seed, shared_prefix_len)
