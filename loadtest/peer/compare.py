"""kvmesh vs a peer, per case (dtype, endpoint, concurrency) and round: ratios kvmesh/peer with
min/median/max over rounds, the targets, and the tables. Pure: summaries in, dicts and text out."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Metric:
    name: str  # as printed and as the JSON key
    key: str  # in a loadtest.metrics summary
    sub: str | None  # percentile key of a distribution; None: a scalar
    higher_is_better: bool


METRICS = (
    Metric("output tok/s", "output_throughput", None, True),
    Metric("TTFT p50 ms", "ttft_ms", "p50", False),
    Metric("TTFT p99 ms", "ttft_ms", "p99", False),
    # TPOT (per request: time after the first token / later tokens) is immune to chunks that arrive
    # in bursts, which drive the ITL p50 towards zero on a CPU-starved server
    Metric("TPOT p50 ms", "tpot_ms", "p50", False),
    Metric("ITL p50 ms", "itl_ms", "p50", False),
    Metric("ITL p99 ms", "itl_ms", "p99", False),
)
BY_NAME = {m.name: m for m in METRICS}


@dataclass(frozen=True, slots=True)
class Target:
    metric: str
    concurrency: int
    bound: float  # on the median ratio kvmesh/peer: >= bound if higher is better, else <= bound

    def passed(self, median_ratio: float | None) -> bool | None:
        if median_ratio is None:
            return None
        better_high = BY_NAME[self.metric].higher_is_better
        return median_ratio >= self.bound if better_high else median_ratio <= self.bound

    def describe(self, peer: str) -> str:
        op = ">=" if BY_NAME[self.metric].higher_is_better else "<="
        return f"{self.metric} at c={self.concurrency} {op} {self.bound:g}x {peer}"


TARGETS = (Target("output tok/s", 16, 1.0), Target("ITL p50 ms", 1, 1.0), Target("TTFT p50 ms", 16, 1.0))


def value(summary: dict, metric: Metric) -> float | None:
    v = summary.get(metric.key)
    if metric.sub is not None:
        v = (v or {}).get(metric.sub)
    return v


def ratio(ours: float | None, peer: float | None) -> float | None:
    return ours / peer if ours is not None and peer else None


def spread(values: list[float | None]) -> dict[str, float] | None:
    """min / median / max of the values present; None when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"min": min(present), "median": statistics.median(present), "max": max(present)}


def restat(rep: dict) -> dict:
    """Recompute the stats and targets of a saved report from its per-round summaries."""
    cases = [c | {"stats": case_stats(c["rounds"])} for c in rep["cases"] if c["rounds"]]
    has_peer = any("peer" in r for c in cases for r in c["rounds"])
    return rep | {"cases": cases, "targets": evaluate_targets(cases) if has_peer else []}


def case_stats(rounds: list[dict]) -> dict:
    """rounds: [{"kvmesh": summary, "peer": summary}, ...] -> per metric, per side and for the ratio,
    min/median/max over rounds."""
    out = {}
    for m in METRICS:
        ours = [value(r["kvmesh"], m) for r in rounds]
        peer = [value(r["peer"], m) for r in rounds] if all("peer" in r for r in rounds) else []
        out[m.name] = {"kvmesh": spread(ours), "peer": spread(peer),
                       "ratio": spread([ratio(a, b) for a, b in zip(ours, peer)])}
    return out


def prompt_check(summary: dict, num_prompt_tokens: int, num_output_tokens: int) -> str | None:
    """None when every completed request had exactly the asked token counts (from usage); else why not."""
    n = summary["num_completed"]
    if summary["num_failed"]:
        return f"{summary['num_failed']} failed: {summary['errors']}"
    if summary["total_input_tokens"] != n * num_prompt_tokens:
        return f"prompt tokens {summary['total_input_tokens']} != {n} x {num_prompt_tokens}"
    if summary["total_output_tokens"] != n * num_output_tokens:
        return f"output tokens {summary['total_output_tokens']} != {n} x {num_output_tokens}"
    return None


def evaluate_targets(cases: list[dict], targets=TARGETS) -> list[dict]:
    """One row per target and (dtype, endpoint) that has the target's concurrency."""
    rows = []
    for t in targets:
        for case in cases:
            if case["concurrency"] != t.concurrency:
                continue
            r = (case["stats"][t.metric]["ratio"] or {}).get("median")
            rows.append({"target": t.describe("peer"), "metric": t.metric, "concurrency": t.concurrency,
                         "bound": t.bound, "dtype": case["dtype"], "endpoint": case["endpoint"],
                         "median_ratio": r, "passed": t.passed(r)})
    return rows


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _triple(s: dict | None, digits: int) -> str:
    return "-" if s is None else " / ".join(_fmt(s[k], digits) for k in ("min", "median", "max"))


def case_title(case: dict) -> str:
    return f"{case['dtype']}, {case['endpoint']}, c={case['concurrency']}"


def case_table(case: dict, peer: str = "vLLM") -> str:
    """Medians per server, and kvmesh/peer as min / median / max over rounds."""
    n = len(case["rounds"])
    lines = [f"---- {case_title(case)} ({n} round{'s' * (n != 1)}) ----",
             f"{'metric':<14} {'kvmesh':>10} {peer:>10}   kvmesh/{peer} min / med / max"]
    for m in METRICS:
        s = case["stats"][m.name]
        med = lambda side: None if s[side] is None else s[side]["median"]  # noqa: E731
        arrow = "(higher=better)" if m.higher_is_better else "(lower=better)"
        digits = 1 if m.higher_is_better else 2
        lines.append(f"{m.name:<14} {_fmt(med('kvmesh'), digits):>10} {_fmt(med('peer'), digits):>10}   "
                     f"{_triple(s['ratio'], 2):<22} {arrow}")
    for note in [*case.get("notes", []), *burst_notes(case, peer)]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


BURSTY = 0.2  # median share of near-zero gaps over rounds above which the ITL p50 is flagged


def burst_notes(case: dict, peer: str = "vLLM") -> list[str]:
    """A note per server whose tokens mostly arrived in bursts (loadtest.metrics.burst_share): its
    ITL p50 then measures how it batches SSE events, and TPOT is the per-token comparison."""
    notes = []
    for side, name in (("kvmesh", "kvmesh"), ("peer", peer)):
        shares = [r[side].get("itl_burst_share") for r in case["rounds"] if side in r]
        s = spread(shares)
        if s is not None and s["median"] > BURSTY:
            notes.append(f"{name} delivered {s['median']:.0%} of its tokens in bursts (< 0.1 ms after the one "
                         "before): its ITL p50 reflects that batching; compare TPOT p50")
    return notes


def targets_table(rows: list[dict], peer: str = "vLLM") -> str:
    lines = ["---- targets (median ratio over rounds) ----"]
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[r["passed"]]
        lines.append(f"{verdict:<5} {r['target'].replace('peer', peer):<34} {r['dtype']:<9} {r['endpoint']:<12} "
                     f"{_fmt(r['median_ratio'], 2)}x")
    return "\n".join(lines)
