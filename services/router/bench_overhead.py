"""Router overhead: generation throughput through the router vs. the worker's internal API directly.

    python -m services.router.bench_overhead [--model tiny] [--concurrency 16] [--requests 64] [--max-tokens 64]

Starts one router and one worker (subprocesses, loopback), runs the same greedy workload both ways
(alternating rounds, so drift hits both), prints tokens/s for each and the ratio router/direct.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import aiohttp

from services.runtime.auth import cluster_headers
from services.runtime.ports import free_port
from services.runtime.wire import CONTENT_TYPE, FrameDecoder, GenerateCall, encode

TOKEN = "bench-overhead-token"


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "KVMESH_CLUSTER_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def _wait_ready(session: aiohttp.ClientSession, router_url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(router_url + "/ready") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the cluster did not become ready")


async def _direct_one(session: aiohttp.ClientSession, worker_url: str, prompt: str, max_tokens: int) -> int:
    call = GenerateCall(uuid.uuid4().hex, {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
                        prompt=prompt)
    headers = {**cluster_headers(TOKEN), "Content-Type": CONTENT_TYPE}
    decoder, num_tokens = FrameDecoder(), 0
    async with session.post(worker_url + "/internal/generate", data=encode(call), headers=headers) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_any():
            for frame in decoder.feed(chunk):
                num_tokens = frame.num_generated_tokens
    return num_tokens


async def _router_one(session: aiohttp.ClientSession, router_url: str, prompt: str, max_tokens: int) -> int:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    num_tokens = 0
    async with session.post(router_url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b'data: {"id"') and b'"usage":{' in line:
                num_tokens = int(line.split(b'"completion_tokens":')[1].split(b",")[0])
    return num_tokens


async def _round(fn, num_requests: int, concurrency: int, max_tokens: int) -> float:
    """Tokens per second for num_requests requests, at most `concurrency` at a time."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with semaphore:
            return await fn(f"Request {i}: the memory cluster serves long contexts", max_tokens)

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(num_requests)))
    elapsed = time.perf_counter() - start
    assert all(c == max_tokens for c in counts), counts
    return sum(counts) / elapsed


async def bench(args: argparse.Namespace, router_url: str, worker_url: str) -> float:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await _wait_ready(session, router_url)
        direct = lambda p, m: _direct_one(session, worker_url, p, m)  # noqa: E731
        routed = lambda p, m: _router_one(session, router_url, p, m)  # noqa: E731
        await _round(direct, args.concurrency, args.concurrency, 8)  # warm-up
        await _round(routed, args.concurrency, args.concurrency, 8)
        rates: dict[str, list[float]] = {"direct": [], "router": []}
        for _ in range(args.rounds):
            rates["direct"].append(await _round(direct, args.requests, args.concurrency, args.max_tokens))
            rates["router"].append(await _round(routed, args.requests, args.concurrency, args.max_tokens))
        d, r = sum(rates["direct"]) / args.rounds, sum(rates["router"]) / args.rounds
        print(f"concurrency={args.concurrency} requests={args.requests} max_tokens={args.max_tokens} "
              f"rounds={args.rounds}")
        print(f"direct (worker internal API): {d:8.1f} tok/s   rounds: {[round(x, 1) for x in rates['direct']]}")
        print(f"through router (OpenAI SSE):  {r:8.1f} tok/s   rounds: {[round(x, 1) for x in rates['router']]}")
        print(f"ratio router/direct: {r / d:.3f}")
        return r / d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.router.bench_overhead", description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker-args", default="", help="extra worker flags, e.g. '--num-threads 1'")
    args = parser.parse_args(argv)
    router_port, worker_port = free_port(), free_port()
    router_url, worker_url = f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{worker_port}"
    procs = [
        _spawn(["services.router", "--port", str(router_port)]),
        _spawn(["services.worker", "--model", args.model, "--router", router_url, "--port", str(worker_port),
                *args.worker_args.split()]),
    ]
    try:
        asyncio.run(bench(args, router_url, worker_url))
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
