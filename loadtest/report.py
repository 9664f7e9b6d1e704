"""Readable tables and the JSON report."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.metrics import COMPARED

_DISTS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(summary: dict, title: str = "") -> str:
    rows = [
        ("requests (completed / failed)", f"{summary['num_completed']} / {summary['num_failed']}"),
        ("duration (s)", _fmt(summary["duration_s"])),
        ("request throughput (req/s)", _fmt(summary["request_throughput"], 3)),
        ("output throughput (tok/s)", _fmt(summary["output_throughput"])),
        ("total token throughput (tok/s)", _fmt(summary["total_token_throughput"])),
        ("input / output tokens", f"{summary['total_input_tokens']:,} / {summary['total_output_tokens']:,}"),
    ]
    if summary.get("errors"):
        rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items()))))
    if "goodput" in summary:
        rows.append((f"goodput (req/s, SLO {summary['slo']})", _fmt(summary["goodput"], 3)))
    check = summary.get("cluster_check")
    if check is not None:
        rows.append(("used KV blocks after run", f"{check['num_used_blocks']} ({'ok' if check['ok'] else 'LEAK'}, "
                     f"{check['source']})" if check.get("checked") else f"not checked: {check.get('reason')}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"==== {title} ====" if title else ""] + [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"{'':<{width}}  {'mean':>10} {'p50':>10} {'p90':>10} {'p99':>10}")
    for key, name in _DISTS:
        d = summary.get(key) or {}
        lines.append(f"{name + ' (ms)':<{width}}  " + " ".join(f"{_fmt(d.get(s)):>10}" for s in ("mean", "p50", "p90", "p99")))
    return "\n".join(line for line in lines if line is not None)


def compare_table(label_a: str, label_b: str, a: dict, b: dict, ratios: dict) -> str:
    lines = [f"A = {label_a}", f"B = {label_b}", f"{'metric':<28} {'A':>12} {'B':>12} {'B/A':>8}"]
    for key, sub, higher_better in COMPARED:
        name = key if sub is None else f"{key}.{sub}"
        va = a.get(key) if sub is None else (a.get(key) or {}).get(sub)
        vb = b.get(key) if sub is None else (b.get(key) or {}).get(sub)
        r = ratios.get(name)
        arrow = "higher=better" if higher_better else "lower=better"
        lines.append(f"{name:<28} {_fmt(va):>12} {_fmt(vb):>12} {_fmt(r, 3) + 'x':>8}  ({arrow})")
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
