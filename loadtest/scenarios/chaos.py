"""Faults while load runs, every answer checked against an undisturbed run of the same request.

Memory servers are killed (-9), frozen for a few seconds (SIGSTOP: a hung host or a stalled
network) and stopped gracefully (SIGTERM: they leave); a worker's engine process is killed. With
``--faults``, whole workers are killed or frozen too (a frozen worker past the router's heartbeat
timeout is presumed dead: its blocks are freed while it sleeps, and it must cope when it wakes),
and the router is frozen (it hears no heartbeat meanwhile, and must not hold that against anyone).
Whatever dies is replaced, as `kvmesh up` does. Requests are greedy or seeded samples over
prompts from a few tokens to several times a worker's KV capacity (they spill); some clients
disconnect mid-stream. A request that completes must equal its reference text exactly. One that
fails must say why in a way a client can act on: an error event naming lost capacity or a dead
engine, or a 400/503 at admission; a hang, a 500 or a cut stream fails the run. Afterwards no KV
block may stay used on any process.

    python -m loadtest.scenarios chaos [--duration 150] [--concurrency 6] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter

import aiohttp

from loadtest import report
from loadtest.cluster_check import check_zero_used_blocks
from loadtest.scenarios.common import add_cluster_arguments, local_cluster
from services.launch.cluster import LocalCluster
from services.launch.procs import Child
from services.launch.supervisor import RestartBudget
from services.runtime.auth import DEV_CLUSTER_TOKEN

PROMPT_LENS = (20, 300, 900, 1500, 2200)
# Why a request may fail while processes die: it is told, and nothing it got was wrong.
EXPECTED_ERRORS = ("lost KV capacity", "engine process died")
WORKER_KILLED = "failed mid-stream"  # the router's word for a worker that died under a stream
# (status, code) of a refusal that is a right answer while capacity comes and goes
EXPECTED_STATUS = {(400, "context_length_exceeded"), (503, "no_worker_available"), (503, "kv_capacity_busy")}


# memserver: kill -9, freeze (SIGSTOP for 2-6 s), term; a worker's engine: kill -9; a whole worker
# (its process group): kill -9, freeze; the router: freeze
FAULT_KINDS = ("kill", "freeze", "term", "kill-engine", "kill-worker", "freeze-worker", "freeze-router")
DEFAULT_FAULTS = ("kill", "kill", "freeze", "term", "kill-engine")


def _faults(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"fault kinds are {', '.join(FAULT_KINDS)}; got {text!r}")
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of faults under load")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--fault-every", type=float, default=15.0, help="mean seconds between faults")
    parser.add_argument("--num-prompts", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--memservers", type=int, default=3, help="memservers at start")
    parser.add_argument("--faults", type=_faults, default=DEFAULT_FAULTS,
                        help=f"comma-separated fault kinds drawn from (repeats weigh more): {', '.join(FAULT_KINDS)}; "
                             f"default {','.join(DEFAULT_FAULTS)}")
    add_cluster_arguments(parser)
    parser.set_defaults(workers=2, worker_kv_blocks=48, memserver_capacity="8MiB")


def _body(i: int, max_tokens: int) -> dict:
    rng = random.Random(i)
    body = {"model": "tiny", "prompt": [rng.randrange(100, 31000) for _ in range(PROMPT_LENS[i % len(PROMPT_LENS)])],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    if i % 3 == 1:
        body.update(temperature=0.9, top_p=0.95, seed=1000 + i)
    elif i % 3 == 2:
        body.update(temperature=0.7, top_k=40, seed=2000 + i)
    return body


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, cut_after: int | None) -> tuple[str, str]:
    """(outcome, detail): ("ok", text), ("cut", ""), ("error_event", message), ("http", "status code")."""
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            error = (await resp.json(content_type=None) or {}).get("error", {})
            return "http", f"{resp.status} {error.get('code')}"
        text, num_deltas = "", 0
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "ok", text
            event = json.loads(line[6:])
            if "error" in event:
                return "error_event", event["error"].get("message", "")
            text += event["choices"][0]["text"]
            num_deltas += 1
            if cut_after is not None and num_deltas >= cut_after:
                return "cut", ""
        return "eof", text  # the stream ended without [DONE]


def _classify(outcome: str, detail: str, reference: str, expected_errors: tuple[str, ...] = EXPECTED_ERRORS) -> str:
    if outcome == "ok":
        return "ok" if detail == reference else "MISMATCH"
    if outcome == "cut":
        return "cut"
    if outcome == "error_event" and any(e in detail for e in expected_errors):
        return "told: " + next(e for e in expected_errors if e in detail)
    if outcome == "http" and (int(detail.split()[0]), detail.split()[1]) in EXPECTED_STATUS:
        return "refused: " + detail
    return "BAD " + outcome


def _fault(cluster: LocalCluster, rng: random.Random, kinds: tuple[str, ...]) -> tuple[str, Child | None]:
    """One fault now: what it was, and the process it froze (the caller continues it)."""
    memservers = [m for m in cluster.memservers if m.alive]
    kind = rng.choice(kinds)
    if kind == "freeze-router":
        cluster.router.signal_group(signal.SIGSTOP)
        return f"freeze {cluster.router.name}", cluster.router
    if kind in ("kill-worker", "freeze-worker"):
        workers = [w for w in cluster.workers if w.alive]
        if len(workers) < 2:  # keep one serving
            return "none (one worker left)", None
        victim = rng.choice(workers)
        victim.signal_group(signal.SIGKILL if kind == "kill-worker" else signal.SIGSTOP)
        return f"{kind.removesuffix('-worker')} {victim.name}", victim if kind == "freeze-worker" else None
    if kind == "kill-engine":
        worker = rng.choice([w for w in cluster.workers if w.alive])
        engines = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
        for pid in engines:
            os.kill(int(pid), signal.SIGKILL)
        return f"kill -9 the engine of {worker.name}", None
    if len(memservers) < 2:  # keep one, or every long request fails by construction
        return "none (one memserver left)", None
    victim = rng.choice(memservers)
    victim.signal_group({"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "term": signal.SIGTERM}[kind])
    return f"{kind} {victim.name}", victim if kind == "freeze" else None


async def _chaos(cluster: LocalCluster, args: argparse.Namespace, stop_at: float, log: list[str]) -> None:
    rng = random.Random(args.seed)
    while time.monotonic() < stop_at - 10:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * args.fault_every)
        what, frozen = await asyncio.to_thread(_fault, cluster, rng, args.faults)
        log.append(what)
        print(f"  {time.strftime('%X')} fault: {what}", flush=True)
        if frozen is not None:
            await asyncio.sleep(rng.uniform(2, 6))  # past the transport's 1 s peer timeout
            frozen.signal_group(signal.SIGCONT)


async def _replace_the_dead(cluster: LocalCluster, stop: asyncio.Event, log: list[str]) -> None:
    budget = RestartBudget(max_restarts=1000)  # faults come on purpose here: no crash-loop guard
    while not stop.is_set():
        for dead, new in await asyncio.to_thread(cluster.replace_dead, budget):
            log.append(f"{dead.name} replaced by {new.name}")
            print(f"  {time.strftime('%X')} {dead.name} exited ({dead.popen.returncode}); {new.name} started",
                  flush=True)
        await asyncio.sleep(0.5)


async def _prompt_tokens(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The router's counts of prompt tokens served, and of those whose KV came from a prefix cache."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    names = {"kvmesh_router_prompt_tokens_total": "prompt", "kvmesh_router_prompt_tokens_cached_total": "cached"}
    return {names[name]: float(value) for name, _, value in (line.partition(" ") for line in text.splitlines())
            if name in names}


async def _run(cluster: LocalCluster, args: argparse.Namespace) -> dict:
    url = cluster.url
    rng = random.Random(args.seed + 1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        references = {}
        for i in range(args.num_prompts):  # undisturbed: one at a time, no faults
            outcome, text = await _stream(session, url, _body(i, args.max_tokens), None)
            if outcome != "ok":
                raise RuntimeError(f"reference request {i} failed: {outcome} {text}")
            references[i] = text
        print(f"  references: {len(references)} requests", flush=True)
        outcomes: Counter = Counter()
        bad: list[str] = []
        faults: list[str] = []
        stop_at = time.monotonic() + args.duration
        expected_errors = EXPECTED_ERRORS + ((WORKER_KILLED,) if "kill-worker" in args.faults else ())

        async def client() -> None:
            while time.monotonic() < stop_at:
                i = rng.randrange(args.num_prompts)
                cut = rng.randrange(1, args.max_tokens) if rng.random() < 0.12 else None
                try:
                    outcome, detail = await _stream(session, url, _body(i, args.max_tokens), cut)
                except (aiohttp.ClientError, TimeoutError) as e:
                    outcome, detail = "exception", repr(e)
                verdict = _classify(outcome, detail, references[i], expected_errors)
                outcomes[verdict] += 1
                if verdict.startswith(("BAD", "MISMATCH")):
                    bad.append(f"prompt {i}: {verdict}: {detail[:160]!r}")

        stop = asyncio.Event()
        replacer = asyncio.create_task(_replace_the_dead(cluster, stop, faults))
        try:
            await asyncio.gather(*(client() for _ in range(args.concurrency)), _chaos(cluster, args, stop_at, faults))
        finally:
            stop.set()
            await replacer
        prompt_tokens = await _prompt_tokens(session, url)
    blocks = await check_zero_used_blocks(url, DEV_CLUSTER_TOKEN, timeout_s=30)
    return {"outcomes": dict(outcomes), "bad": bad, "faults": faults, "cluster_check": blocks,
            "prompt_tokens": prompt_tokens}


def main(args: argparse.Namespace) -> int:
    with local_cluster(args, args.memservers, "chaos") as cluster:
        result = asyncio.run(_run(cluster, args))
    outcomes, blocks = result["outcomes"], result["cluster_check"]
    print("outcome                                   requests")
    for verdict, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"{verdict:<42}{n:>8}")
    for line in result["bad"][:20]:
        print("  " + line)
    tokens = result["prompt_tokens"]
    print(f"faults: {len(result['faults'])}; KV blocks used at the end: {blocks.get('num_used_blocks')}; "
          f"prompt tokens from the prefix cache: {tokens.get('cached', 0):.0f} of {tokens.get('prompt', 0):.0f}")
    for line in blocks.get("holders", []):
        print("  holds blocks: " + line)
    report.write_json(args.out / "chaos.json", result)
    ok = not result["bad"] and outcomes.get("ok", 0) > 0 and blocks.get("ok", False)
    print(f"chaos: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1
