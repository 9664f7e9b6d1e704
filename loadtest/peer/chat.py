"""Streaming /v1/chat/completions requests of an exact prompt length, timed like loadtest.client
times /v1/completions (TTFT, inter-chunk latencies, end to end), into the same RequestResult."""

from __future__ import annotations

import random
from typing import Callable

import aiohttp

from loadtest.client import RequestResult, Target, send
from loadtest.prompts import WORDS
from loadtest.workloads import RequestSpec

PAD = (".", " a", ",", " e", "!", " o")  # short texts that add at most one token each to most BPEs


def fit_text(count: Callable[[str], int], num_tokens: int, seed: int, max_pad: int = 64) -> str:
    """Text whose count(text) is exactly num_tokens: random words while they fit, then short pads.
    `count` is the server's token count of the whole templated prompt for that text (monotone in
    practice). ValueError if no exact fit is found."""
    rng = random.Random(seed)
    text = ""
    while count(longer := (text + " " + rng.choice(WORDS)).lstrip()) <= num_tokens:
        text = longer
    for i in range(max_pad):
        if count(text) == num_tokens:
            return text
        longer = text + PAD[i % len(PAD)]
        if count(longer) <= num_tokens:
            text = longer
    raise ValueError(f"could not fit a chat prompt of exactly {num_tokens} tokens (seed {seed})")


class ChatPrompts:
    """messages for request i, whose templated prompt is `num_tokens` + `offset` tokens by the local
    tokenizer; `offset` corrects for a server that counts differently (see calibrate_offset)."""

    def __init__(self, count_messages: Callable[[list[dict]], int], offset: int = 0, seed: int = 0):
        self._count = count_messages
        self.offset = offset
        self.seed = seed
        self._cache: dict[tuple[int, int], list[dict]] = {}

    def build(self, index: int, num_tokens: int) -> list[dict]:
        key = (index, num_tokens)
        if key not in self._cache:
            text = fit_text(lambda t: self._count(_messages(t)), num_tokens - self.offset,
                            seed=self.seed * 7_919 + index)
            self._cache[key] = _messages(text)
        return self._cache[key]


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def local_counter(model_dir) -> Callable[[list[dict]], int]:
    """Token count of the templated chat prompt, as kvmesh and vLLM compute it (transformers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    def count(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))

    return count


def request_body(target: Target, spec: RequestSpec, messages: list[dict], ignore_eos: bool) -> dict:
    body = {"model": target.model, "messages": messages, "max_tokens": spec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def prompt_tokens(session: aiohttp.ClientSession, target: Target, messages: list[dict]) -> int:
    """The server's usage.prompt_tokens for these messages (one non-streaming 1-token request)."""
    body = {"model": target.model, "messages": messages, "max_tokens": 1, "temperature": 0.0}
    async with session.post(target.base + "/chat/completions", json=body) as resp:
        payload = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"chat probe to {target.base}: HTTP {resp.status}: {str(payload)[:300]}")
    return payload["usage"]["prompt_tokens"]


async def calibrate_offset(session: aiohttp.ClientSession, target: Target, prompts: ChatPrompts,
                           num_tokens: int, index: int) -> int:
    """Server count minus intended count for one sample; 0 when the server agrees with the local tokenizer."""
    return await prompt_tokens(session, target, prompts.build(index, num_tokens)) - num_tokens


async def send_chat(session: aiohttp.ClientSession, target: Target, spec: RequestSpec, messages: list[dict], *,
                    run_start: float, ignore_eos: bool = True, timeout_s: float = 600.0) -> RequestResult:
    return await send(session, target, spec, None, run_start=run_start, ignore_eos=ignore_eos, timeout_s=timeout_s,
                      path="/chat/completions", body=request_body(target, spec, messages, ignore_eos))
