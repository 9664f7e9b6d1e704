"""Benchmark 2: the longest context one request can have vs the number of memservers. For each M a
cluster of one worker (a small fixed pool) and M memservers (a small fixed capacity): the router's
advertised max_context_tokens is compared with (total blocks x block size), then checked by serving
a request of exactly that many tokens (prompt + max_tokens; must succeed) and one token more (must
be refused with 400 context_length_exceeded)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from loadtest.distattention.cluster import BenchCluster, ClusterSpec, WorkerSpec
from loadtest.distattention.timing import random_prompt, timed_completion

WORKER = "w"


async def _serve(session: aiohttp.ClientSession, url: str, total_tokens: int, max_tokens: int, seed: int) -> dict:
    prompt = random_prompt(total_tokens - max_tokens, seed)
    s = await timed_completion(session, url, WORKER, prompt, max_tokens)
    return {"total_tokens": total_tokens, "ok": s.ok and len(s.token_times_s) == max_tokens, "status": s.status,
            "error_code": s.error_code, "error": s.error, "num_tokens": len(s.token_times_s)}


async def _largest_served(session, cluster: BenchCluster, lo: int, hi: int, max_tokens: int) -> int:
    """Binary search for the longest servable total in (lo, hi): only when `hi` itself failed."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = (await _serve(session, cluster.url, mid, max_tokens, seed=mid))["ok"]
        await asyncio.to_thread(cluster.wait_zero_used)
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo


async def probe_cluster(cluster: BenchCluster, max_tokens: int) -> dict:
    view = cluster.cluster()
    bs = view["block_size"]
    worker_blocks = sum(w["num_blocks"] for w in view["workers"])
    memserver_blocks = [m["num_blocks"] for m in view["memservers"]]
    total_blocks = worker_blocks + sum(memserver_blocks)
    advertised = view["max_context_tokens"]
    async with aiohttp.ClientSession() as session:
        at = await _serve(session, cluster.url, advertised, max_tokens, seed=1)
        used_after_at = await asyncio.to_thread(cluster.wait_zero_used)
        over = await _serve(session, cluster.url, advertised + 1, max_tokens, seed=2)
        used_after_over = await asyncio.to_thread(cluster.wait_zero_used)
        if over["ok"]:  # served beyond what the router advertises: report it, it is not a pass
            largest = advertised + 1
        elif at["ok"]:
            largest = advertised
        else:
            largest = await _largest_served(session, cluster, max_tokens, advertised, max_tokens)
    theoretical = total_blocks * bs
    return {
        "num_memservers": len(memserver_blocks), "block_size": bs, "worker_blocks": worker_blocks,
        "memserver_blocks": memserver_blocks, "total_blocks": total_blocks, "theoretical_tokens": theoretical,
        "advertised_max_context": advertised, "at_advertised": at, "over_advertised": over,
        "over_refused_properly": over["status"] == 400 and over["error_code"] == "context_length_exceeded",
        "largest_served": largest, "ratio": largest / theoretical if theoretical else None,
        "used_after": {"at": used_after_at, "over": used_after_over},
        "leak": any(v != 0 for d in (used_after_at, used_after_over) for v in d.values()),
    }


def run(memserver_counts: list[int], worker_blocks: int, capacity: str, max_tokens: int, log_root: Path,
        token: str, worker_threads: int | None = None, env: tuple[tuple[str, str], ...] = (), log=print) -> list[dict]:
    rows = []
    for m in memserver_counts:
        spec = ClusterSpec(f"cap-m{m}", (WorkerSpec(WORKER, worker_blocks),), m, capacity,
                           worker_threads=worker_threads, env=env)
        t0 = time.perf_counter()
        with BenchCluster(spec, log_root / spec.name, token) as cluster:
            row = asyncio.run(probe_cluster(cluster, max_tokens))
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        log(f"  M={m}: advertised {row['advertised_max_context']:,} tokens of {row['theoretical_tokens']:,}; "
            f"at it: {'served' if row['at_advertised']['ok'] else 'FAILED ' + str(row['at_advertised']['error'])}; "
            f"+1: HTTP {row['over_advertised']['status']} {row['over_advertised']['error_code']}; "
            f"{row['wall_s']:.0f}s")
    return rows
