"""Aggregate per-request results into the figures `vllm bench serve` reports. Pure."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from loadtest.client import RequestResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class Slo:
    """Per-request service-level objectives in milliseconds; None: not constrained."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft_ms, r.ttft_s), (self.tpot_ms, r.tpot_s), (self.e2e_ms, r.e2e_s))
        return all(limit is None or (value is not None and value * 1000 <= limit) for limit, value in checks)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution_ms(values_s: list[float]) -> dict[str, float] | None:
    if not values_s:
        return None
    ms = sorted(v * 1000 for v in values_s)
    return {"mean": statistics.fmean(ms), **{f"p{q}": percentile(ms, q) for q in PERCENTILES}}


BURST_GAP_S = 1e-4  # tokens this close to the one before arrived in the same read


def burst_share(itls_s: list[float]) -> float | None:
    """Share of inter-token gaps under BURST_GAP_S: a server that flushes several SSE events at once
    shows near-zero gaps, which pull its ITL p50 down without any token coming sooner."""
    return sum(x < BURST_GAP_S for x in itls_s) / len(itls_s) if itls_s else None


def summarize(results: list[RequestResult], duration_s: float, slo: Slo = Slo()) -> dict:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.num_prompt_tokens for r in done)
    output_tokens = sum(r.num_output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    summary = {
        "num_requests": len(results),
        "num_completed": len(done),
        "num_failed": len(results) - len(done),
        "errors": dict(Counter(r.error_kind for r in results if not r.ok)),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": distribution_ms([x for r in done for x in r.itls_s]),
        "itl_burst_share": burst_share([x for r in done for x in r.itls_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done if r.e2e_s is not None]),
        "num_long_completed": sum(r.is_long for r in done),
    }
    if slo.any:
        num_good = sum(slo.met(r) for r in results)
        summary["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms}
        summary["num_good"] = num_good
        summary["goodput"] = per_s(num_good)
    return summary


COMPARED = (  # (key, sub-key or None, higher is better)
    ("request_throughput", None, True), ("output_throughput", None, True), ("total_token_throughput", None, True),
    ("ttft_ms", "p50", False), ("ttft_ms", "p99", False), ("tpot_ms", "p50", False), ("itl_ms", "p50", False),
    ("e2e_ms", "p50", False), ("e2e_ms", "p99", False),
)


def ratios(a: dict, b: dict) -> dict[str, float | None]:
    """B / A for each compared figure (None where either side has no value)."""
    out = {}
    for key, sub, _ in COMPARED:
        va, vb = a.get(key), b.get(key)
        if sub is not None:
            va, vb = (va or {}).get(sub), (vb or {}).get(sub)
        name = key if sub is None else f"{key}.{sub}"
        out[name] = vb / va if va and vb is not None else None
    return out
