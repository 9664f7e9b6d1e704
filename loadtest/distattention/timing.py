"""One greedy streaming completion, timed per token, and the plain numbers drawn from it.

`logprobs: 0` makes the router send one chunk per generated token even when a token's text is
empty (a byte-level tokenizer holds back partial UTF-8), so chunk arrival times are token times."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(slots=True)
class TimedStream:
    status: int
    error: str | None = None
    error_code: str | None = None
    ttft_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # since the request was sent, one per token
    num_completion_tokens: int | None = None  # from usage

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]


def random_prompt(num_tokens: int, seed: int, vocab: int = 32000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(num_tokens)]


async def timed_completion(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                           max_tokens: int, on_token=None, timeout_s: float = 3600.0) -> TimedStream:
    """on_token(i): called after the i-th token's chunk arrives (e.g. to look at the cluster mid-decode)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            return _http_error(resp.status, await resp.text())
        result = TimedStream(resp.status)
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                result.error = str(event["error"].get("message"))
                result.error_code = event["error"].get("code")
                break
            if event.get("usage"):
                result.num_completion_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                num = len((choice.get("logprobs") or {}).get("tokens") or [])
                now = time.perf_counter() - start
                for _ in range(num):
                    result.token_times_s.append(now)
                    if on_token is not None:
                        on_token(len(result.token_times_s))
        if result.token_times_s:
            result.ttft_s = result.token_times_s[0]
        return result


def _http_error(status: int, text: str) -> TimedStream:
    try:
        err = json.loads(text)["error"]
        return TimedStream(status, str(err.get("message")), err.get("code"))
    except (ValueError, KeyError, TypeError):
        return TimedStream(status, text[:300])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
