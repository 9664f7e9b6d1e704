"""Issue 8's long-context part: prompts of k x the worker's local KV capacity (k = 4, 8, 16) served
with 2 memservers, against the same requests on an all-local worker big enough to hold them
(kvmesh both times). Decode speed is reported as tokens/s = 1000 / median ITL, and the ratio to
all-local (target: >= 0.75x at 8x). Built on benchmark 1's plans: a context of k x capacity has
a planned remote share of 1 - 1/k."""

from __future__ import annotations

from loadtest.distattention.decode_plan import DecodePlan, decode_plan
from loadtest.distattention.report import fmt

TARGET_MULTIPLE = 8
TARGET_SPEED = 0.75  # decode tok/s at 8x local capacity, as a share of all-local


def longctx_plans(local_blocks: int, multiples: list[int], num_memservers: int, decode_tokens: int,
                  block_size: int = 16, worker_threads: int | None = None,
                  env: tuple[tuple[str, str], ...] = (),
                  memserver_threads: int | None = None) -> list[tuple[int, DecodePlan]]:
    """One plan per multiple k: prompt = k x local capacity - decode tokens (the whole request is
    k x capacity); the spilling worker's pool is the local capacity (plus the decode tail)."""
    if local_blocks < 4:
        raise ValueError(f"--local-blocks must be >= 4, got {local_blocks}")
    if not multiples or min(multiples) < 2:
        raise ValueError(f"multiples must be >= 2, got {multiples}")
    plans = []
    for k in multiples:
        total = k * local_blocks * block_size
        context = total - decode_tokens
        plan = decode_plan(context, [1 - 1 / k], [num_memservers], decode_tokens, block_size,
                           worker_threads=worker_threads, env=env, memserver_threads=memserver_threads)
        plans.append((k, plan))
    return plans


def summarize(k: int, summary: list[dict]) -> dict:
    """benchmark 1's per-case summary of one plan -> one row: local vs remote decode speed."""
    local = next(s for s in summary if s["num_memservers"] == 0)
    remote = next(s for s in summary if s["num_memservers"] > 0)
    speed = (lambda s: 1000 / s["itl_median_ms"] if s["itl_median_ms"] else None)
    local_tps, remote_tps = speed(local), speed(remote)
    return {
        "multiple": k, "context": remote["context"], "num_memservers": remote["num_memservers"],
        "remote_kv_blocks": remote["num_kv_blocks"], "local_kv_blocks": local["num_kv_blocks"],
        "measured_remote_fraction": remote["measured_remote_fraction"],
        "local_tok_s": local_tps, "remote_tok_s": remote_tps,
        "local_itl_ms": local["itl_median_ms"], "remote_itl_ms": remote["itl_median_ms"],
        "local_itl_p90_ms": local["itl_p90_ms"], "remote_itl_p90_ms": remote["itl_p90_ms"],
        "speed_vs_local": remote_tps / local_tps if local_tps and remote_tps else None,
        "paired_speed": [1 / r for r in remote["paired_ratios"] if r],
        "num_failed": local["num_failed"] + remote["num_failed"], "num_recomputes": remote.get("num_recomputes"),
    }


def table(rows: list[dict]) -> str:
    head = (f"{'x cap':>5} {'context':>7} {'remote':>6} {'local tok/s':>11} {'spill tok/s':>11} "
            f"{'ITL p50 local/spill ms':>22} {'ITL p90 local/spill ms':>22} {'speed x local':>13} "
            f"{'per round':>16} {'failed':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        frac = r["measured_remote_fraction"]
        rounds = ", ".join(f"{x:.2f}" for x in r["paired_speed"])
        lines.append(
            f"{r['multiple']:>5} {r['context']:>7} {'-' if frac is None else f'{frac:.0%}':>6} "
            f"{fmt(r['local_tok_s'], '.1f'):>11} {fmt(r['remote_tok_s'], '.1f'):>11} "
            f"{fmt(r['local_itl_ms']) + ' / ' + fmt(r['remote_itl_ms']):>22} "
            f"{fmt(r['local_itl_p90_ms']) + ' / ' + fmt(r['remote_itl_p90_ms']):>22} "
            f"{fmt(r['speed_vs_local'], '.3f'):>13} {rounds:>16} {r['num_failed']:>6}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    row = next((r for r in rows if r["multiple"] == TARGET_MULTIPLE), None)
    if row is None or row["speed_vs_local"] is None:
        return f"{TARGET_MULTIPLE}x local capacity not measured: no verdict"
    ok = row["speed_vs_local"] >= TARGET_SPEED
    return (f"decode at {TARGET_MULTIPLE}x local capacity = {row['speed_vs_local']:.3f}x all-local tok/s -> "
            f"{'PASS' if ok else 'FAIL'} (target >= {TARGET_SPEED}x)")
