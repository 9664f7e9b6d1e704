"""Benchmark 1: decode inter-token latency vs the fraction of the KV on memservers, against an
all-local worker measured in the same run. Every cluster of a context length is up at once and the
cases are interleaved round by round (rotated order), one request at a time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import aiohttp

from loadtest.distattention.cluster import BenchCluster
from loadtest.distattention.decode_plan import DecodeCase, DecodePlan
from loadtest.distattention.timing import median, percentile, random_prompt, timed_completion


def _remote_snapshot(cluster: BenchCluster, worker: str) -> dict:
    """Where the running request's KV is now: local blocks on its worker, remote per memserver
    (each process's own count: the router's view of a worker lags by a heartbeat)."""
    local = (cluster.stats(cluster.workers[worker]) or {}).get("num_used_blocks")
    remote = {m.name: (cluster.stats(m) or {}).get("num_used_blocks") or 0 for m in cluster.memservers}
    total = (local or 0) + sum(remote.values())
    return {"local_blocks": local, "remote_blocks": remote,
            "remote_fraction": sum(remote.values()) / total if total else None}


async def measure(session: aiohttp.ClientSession, cluster: BenchCluster, case: DecodeCase, prompt: list[int],
                  decode_tokens: int) -> dict:
    loop = asyncio.get_running_loop()
    snapshot: list[asyncio.Future] = []

    def on_token(i: int) -> None:
        if i == decode_tokens // 2:  # mid-decode: the spill pattern has settled
            snapshot.append(loop.run_in_executor(None, _remote_snapshot, cluster, case.worker))

    t0 = time.perf_counter()
    s = await timed_completion(session, cluster.url, case.worker, prompt, decode_tokens, on_token)
    where = await snapshot[0] if snapshot else {}
    itls = s.itls_s
    decode_s = s.token_times_s[-1] - s.token_times_s[0] if len(s.token_times_s) > 1 else None
    return {
        "case": case.label, "ok": s.ok and len(s.token_times_s) == decode_tokens, "status": s.status,
        "error": s.error, "wall_s": time.perf_counter() - t0, "ttft_s": s.ttft_s,
        "num_tokens": len(s.token_times_s), "itl_median_ms": _ms(median(itls)),
        "itl_p90_ms": _ms(percentile(itls, 0.9)), "tpot_mean_ms": _ms(decode_s / len(itls) if itls else None),
        "itls_ms": [round(x * 1e3, 3) for x in itls], **where,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


async def run_rounds(plan: DecodePlan, clusters: dict[str, BenchCluster], rounds: int, seed: int,
                     log=print) -> tuple[list[dict], list[dict]]:
    """-> (one row per request, the zero-used-blocks checks between requests that found a leak)."""
    rows, leaks = [], []
    warm_prompt = random_prompt(64, seed - 1)  # shares no block with the measured prompts
    cases = list(plan.cases)
    async with aiohttp.ClientSession() as session:
        for case in cases:  # warm-up: model, threads, HTTP paths (short prompt: nothing spills)
            warm = await timed_completion(session, clusters[case.cluster].url, case.worker, warm_prompt, 4)
            if not warm.ok:
                raise RuntimeError(f"warm-up of {case.label} failed: HTTP {warm.status} {warm.error}")
        for r in range(rounds):
            # A new prompt each round (the same for every case): no round starts from KV a worker's
            # prefix cache kept from the one before, so each prefills its whole prompt.
            prompt = random_prompt(plan.context, seed + r)
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for case in order:
                cluster = clusters[case.cluster]
                row = {"round": r, **await measure(session, cluster, case, prompt, plan.decode_tokens)}
                rows.append(row)
                log(_progress_line(plan.context, row))
                used = await asyncio.to_thread(cluster.wait_zero_used)
                if any(v != 0 for v in used.values()):
                    leaks.append({"after": case.label, "round": r, "used": used})
                    log(f"   !! used blocks after {case.label}: {used}")
    return rows, leaks


def _progress_line(context: int, row: dict) -> str:
    if not row["ok"]:
        return f"  C={context} round {row['round']} {row['case']:<8} FAILED: HTTP {row['status']} {row['error']}"
    frac = row.get("remote_fraction")
    return (f"  C={context} round {row['round']} {row['case']:<8} prefill+TTFT {row['ttft_s']:7.1f}s  "
            f"ITL median {row['itl_median_ms']:7.2f} ms  p90 {row['itl_p90_ms']:7.2f} ms  "
            f"remote {'-' if frac is None else f'{frac:.0%}'} {row.get('remote_blocks') or ''}")


def summarize(plan: DecodePlan, rows: list[dict]) -> list[dict]:
    """Per case: median ITL over all its decode tokens (every round), and its ratio to the all-local
    baseline's; plus the per-round paired ratios (same round, so the same background load)."""
    by_case = {c.label: [r for r in rows if r["case"] == c.label and r["ok"]] for c in plan.cases}
    base_label = plan.cases[0].label
    base_itls = [x for r in by_case[base_label] for x in r["itls_ms"]]
    base_by_round = {r["round"]: r["itl_median_ms"] for r in by_case[base_label]}
    out = []
    for case in plan.cases:
        done = by_case[case.label]
        itls = [x for r in done for x in r["itls_ms"]]
        paired = [r["itl_median_ms"] / base_by_round[r["round"]] for r in done if r["round"] in base_by_round]
        fracs = [r["remote_fraction"] for r in done if r.get("remote_fraction") is not None]
        out.append({
            **asdict(case), "context": plan.context, "num_ok": len(done),
            "num_failed": sum(1 for r in rows if r["case"] == case.label and not r["ok"]),
            "measured_remote_fraction": median(fracs), "itl_median_ms": median(itls),
            "itl_p90_ms": percentile(itls, 0.9), "ttft_median_s": median([r["ttft_s"] for r in done]),
            "ratio_vs_local": (median(itls) / median(base_itls)) if itls and base_itls else None,
            "paired_ratios": paired, "baseline": base_label,
        })
    return out


@contextlib.contextmanager
def running(plan: DecodePlan, log_root: Path, token: str, log=print):
    """All clusters of the plan, started one after another; all stopped on the way out."""
    clusters: dict[str, BenchCluster] = {}
    try:
        for spec in plan.clusters:
            cluster = BenchCluster(spec, log_root / f"C{plan.context}-{spec.name}", token)
            clusters[spec.name] = cluster
            t0 = time.perf_counter()
            cluster.start()
            pools = ", ".join(f"{w.name}={w.num_kv_blocks}" for w in spec.workers)
            log(f"  cluster {spec.name} up in {time.perf_counter() - t0:.0f}s: {spec.num_memservers} memserver(s) "
                f"of {spec.memserver_capacity}, worker pools (blocks) {pools}; logs {cluster.log_dir}")
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.stop()


def run_rounds_sync(plan: DecodePlan, clusters: dict[str, BenchCluster], rounds: int, seed: int):
    return asyncio.run(run_rounds(plan, clusters, rounds, seed))


def recompute_counts(plan: DecodePlan, clusters: dict[str, BenchCluster]) -> dict[str, int]:
    """Per case: how often its worker recomputed a sequence from scratch (a memserver deemed lost)."""
    counts = {}
    for case in plan.cases:
        log_path = clusters[case.cluster].workers[case.worker].log_path
        counts[case.label] = log_path.read_text(errors="replace").count("sequence_recomputed")
    return counts
