"""One streaming /v1/completions request, timed per chunk: TTFT, inter-token latencies, end to end."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from loadtest.workloads import RequestSpec


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # base URL; /v1 is appended unless present
    model: str
    label: str = "A"

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


@dataclass(slots=True)
class RequestResult:
    index: int
    target: str
    start_s: float  # since the run began
    num_prompt_tokens: int
    is_long: bool = False
    ok: bool = False
    error_kind: str | None = None  # http_<status> | timeout | connection | stream:<code> | incomplete
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


def request_body(target: Target, spec: RequestSpec, prompt, ignore_eos: bool) -> dict:
    body = {"model": target.model, "prompt": prompt, "max_tokens": spec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0}
    if ignore_eos:  # a vLLM/kvmesh extension: exactly max_tokens out
        body["ignore_eos"] = True
    return body


async def send(session: aiohttp.ClientSession, target: Target, spec: RequestSpec, prompt, *,
               run_start: float, ignore_eos: bool = True, timeout_s: float = 600.0,
               path: str = "/completions", body: dict | None = None) -> RequestResult:
    """One streamed request (a completion of `prompt`, or `body` posted to `path`), timed."""
    start = time.perf_counter()
    result = RequestResult(spec.index, target.label, start - run_start, spec.num_prompt_tokens, spec.is_long)
    body = body if body is not None else request_body(target, spec, prompt, ignore_eos)
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(session, target.base + path, body, start, result)
    except TimeoutError:
        result.error_kind, result.error = "timeout", f"no answer within {timeout_s}s"
    except aiohttp.ClientError as e:
        result.error_kind, result.error = "connection", f"{type(e).__name__}: {e}"
    result.e2e_s = time.perf_counter() - start
    return result


def _has_content(choice: dict) -> bool:
    """A completions chunk carries `text`, a chat chunk `delta.content`."""
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, start: float,
                  result: RequestResult) -> None:
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            text = await resp.text()
            result.error_kind, result.error = f"http_{resp.status}", text[:300]
            return
        last = start
        num_chunks = 0
        usage_tokens = None
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                result.ok = True
                break
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                result.error_kind = f"stream:{err.get('code') or err.get('type') or 'error'}"
                result.error = str(err.get("message"))[:300]
                return
            if event.get("usage"):
                result.num_prompt_tokens = event["usage"].get("prompt_tokens", result.num_prompt_tokens)
                usage_tokens = event["usage"].get("completion_tokens")
            if any(_has_content(c) for c in event.get("choices", [])):
                now = time.perf_counter()
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.itls_s.append(now - last)
                last = now
                num_chunks += 1
        result.num_output_tokens = usage_tokens if usage_tokens is not None else num_chunks
        if not result.ok:
            result.error_kind, result.error = "incomplete", "stream ended without [DONE]"
