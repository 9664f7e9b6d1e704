"""`kvmesh chat`: a streaming chat client for any OpenAI-compatible server.

Interactive by default (history kept across turns; Ctrl-C stops the current answer, Ctrl-D or
/exit quits); `--prompt` asks once and exits. After each answer: TTFT and tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from services.runtime.auth import API_KEY_ENV, resolve_api_keys


@dataclass(frozen=True, slots=True)
class ChatConfig:
    url: str
    model: str | None
    max_tokens: int | None
    temperature: float | None  # None: the server's default (the model's generation config, else 1)
    api_key: str | None
    ca_certs: str | None = None  # PEM CAs to trust for an https URL, instead of the host's


@dataclass(slots=True)
class TurnStats:
    ttft_s: float | None = None
    num_tokens: int = 0
    elapsed_s: float = 0.0
    thinking: bool = False  # reasoning is being shown

    def summary(self) -> str:
        ttft = f"{self.ttft_s:.3f}s" if self.ttft_s is not None else "n/a"
        decode_s = self.elapsed_s - (self.ttft_s or 0.0)
        rate = (self.num_tokens - 1) / decode_s if self.num_tokens > 1 and decode_s > 0 else 0.0
        return f"[ttft {ttft} | {self.num_tokens} tokens | {rate:.1f} tok/s]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (/v1 is appended)")
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the server's (the model's generation_config.json, else 1)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--prompt", default=None, help="ask once and exit")
    parser.add_argument("--api-key", default=None,
                        help="sent as 'Authorization: Bearer KEY' (default: the first of $KVMESH_API_KEY)")
    parser.add_argument("--ca-certs", default=None, metavar="FILE",
                        help="for an https URL: trust the CAs (or the self-signed certificate) in this PEM file "
                             "instead of the host's ($SSL_CERT_FILE works too)")


def _base(config: ChatConfig) -> str:
    url = config.url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def _first_model(session: aiohttp.ClientSession, config: ChatConfig) -> str:
    async with session.get(_base(config) + "/models") as resp:
        body = await resp.json()
        if resp.status == 401:
            raise RuntimeError(f"{_base(config)} wants an API key: pass --api-key or set {API_KEY_ENV}")
        if resp.status != 200 or not body.get("data"):
            raise RuntimeError(f"no model listed at {_base(config)}/models: {body}")
        return body["data"][0]["id"]


async def stream_answer(session: aiohttp.ClientSession, config: ChatConfig, model: str, messages: list[dict],
                        out, stats: TurnStats, parts: list[str]) -> None:
    """Stream one assistant answer to `out`, appending its text to `parts` as it arrives. Reasoning
    (a router with --reasoning-parser) is shown too, in brackets, but kept out of `parts`: the
    next turn's history holds the answer only, as thinking models expect."""
    body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    start = time.monotonic()
    async with session.post(_base(config) + "/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:500]}")
        async for raw in resp.content:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"server error: {event['error'].get('message')}")
            if event.get("usage"):
                stats.num_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("reasoning_content"):
                    if stats.ttft_s is None:
                        stats.ttft_s = time.monotonic() - start
                    if not stats.thinking:
                        stats.thinking = True
                        out.write("[thinking: ")
                    out.write(delta["reasoning_content"])
                    out.flush()
                text = delta.get("content")
                if text and stats.thinking:
                    stats.thinking = False
                    out.write("]\n")
                if text:
                    if stats.ttft_s is None:
                        stats.ttft_s = time.monotonic() - start
                    parts.append(text)
                    stats.num_tokens = max(stats.num_tokens, len(parts))
                    out.write(text)
                    out.flush()
            stats.elapsed_s = time.monotonic() - start
    if stats.thinking:  # cut short while still thinking
        stats.thinking = False
        out.write("]\n")
    stats.elapsed_s = time.monotonic() - start


def _session(config: ChatConfig) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    connector = None
    if config.ca_certs is not None:
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=config.ca_certs))
    return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None, connect=10),
                                 connector=connector)


def main(args: argparse.Namespace) -> int:
    env_keys = resolve_api_keys(None)  # $KVMESH_API_KEY, read as the router reads it
    api_key = args.api_key or (env_keys[0] if env_keys else None)
    config = ChatConfig(args.url, args.model, args.max_tokens, args.temperature, api_key, args.ca_certs)
    if config.ca_certs is not None and not Path(config.ca_certs).is_file():
        print(f"error: --ca-certs {config.ca_certs!r}: no such file", file=sys.stderr)
        return 2
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    with asyncio.Runner() as runner:  # Runner turns Ctrl-C into cancelling the running turn
        session = runner.run(_make_session(config))
        try:
            try:
                model = config.model or runner.run(_first_model(session, config))
            except (RuntimeError, aiohttp.ClientError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            while True:
                if args.prompt is not None:
                    user = args.prompt
                else:
                    try:
                        user = input("\n>>> ")
                    except (EOFError, KeyboardInterrupt):
                        print()
                        return 0
                    if user.strip() in ("/exit", "/quit"):
                        return 0
                    if not user.strip():
                        continue
                history.append({"role": "user", "content": user})
                parts: list[str] = []
                stats = TurnStats()
                try:
                    runner.run(stream_answer(session, config, model, history, sys.stdout, stats, parts))
                except KeyboardInterrupt:
                    print("\n[stopped]", file=sys.stderr)
                except (RuntimeError, aiohttp.ClientError) as e:
                    print(f"\nerror: {e}", file=sys.stderr)
                    if args.prompt is not None:
                        return 1
                history.append({"role": "assistant", "content": "".join(parts)})
                print(f"\n{stats.summary()}", file=sys.stderr)
                if args.prompt is not None:
                    return 0
        finally:
            runner.run(session.close())


async def _make_session(config: ChatConfig) -> aiohttp.ClientSession:
    return _session(config)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvmesh chat")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
