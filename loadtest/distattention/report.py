"""Readable tables and PNG plots (matplotlib Agg) for both benchmarks."""

from __future__ import annotations

from pathlib import Path

TARGET_FRACTION = 0.75
TARGET_RATIO = 1.3  # issue 6: decode with 75% of the KV remote within 1.3x of all-local
CAPACITY_TOLERANCE = 0.02


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def decode_table(summary: list[dict]) -> str:
    head = (f"{'context':>7} {'case':<8} {'M':>2} {'planned':>7} {'measured':>8} {'local blk':>9} {'ok':>3} "
            f"{'recomp':>6} "
            f"{'TTFT s':>7} {'ITL p50 ms':>10} {'ITL p90 ms':>10} {'x local':>8} {'per-round x':>18}")
    lines = [head, "-" * len(head)]
    for s in summary:
        rounds = ", ".join(f"{r:.2f}" for r in s["paired_ratios"])
        lines.append(
            f"{s['context']:>7} {s['label']:<8} {s['num_memservers']:>2} {s['fraction']:>7.0%} "
            f"{fmt(s['measured_remote_fraction'], '.0%'):>8} {s['num_kv_blocks']:>9} {s['num_ok']:>3} "
            f"{fmt(s.get('num_recomputes'), 'd'):>6} "
            f"{fmt(s['ttft_median_s'], '.1f'):>7} {fmt(s['itl_median_ms']):>10} {fmt(s['itl_p90_ms']):>10} "
            f"{fmt(s['ratio_vs_local'], '.3f'):>8} {rounds:>18}")
    return "\n".join(lines)


def decode_verdicts(summary: list[dict]) -> list[str]:
    out = []
    for s in summary:
        if s["fraction"] == TARGET_FRACTION and s["ratio_vs_local"] is not None:
            ok = s["ratio_vs_local"] <= TARGET_RATIO
            out.append(f"C={s['context']} M={s['num_memservers']}: 75% remote decode = {s['ratio_vs_local']:.3f}x "
                       f"all-local -> {'PASS' if ok else 'FAIL'} (target <= {TARGET_RATIO}x)")
    return out


def capacity_table(rows: list[dict]) -> str:
    head = (f"{'M':>2} {'total blocks':>12} {'theoretical':>11} {'advertised':>10} {'largest served':>14} "
            f"{'ratio':>6} {'+1 refused':>10} {'step vs M-1':>11} {'leak':>5}")
    lines = [head, "-" * len(head)]
    prev = None
    for r in rows:
        step = "-" if prev is None else f"{r['largest_served'] - prev:+,}"
        refused, leak = "yes" if r["over_refused_properly"] else "NO", "YES" if r["leak"] else "no"
        lines.append(f"{r['num_memservers']:>2} {r['total_blocks']:>12,} {r['theoretical_tokens']:>11,} "
                     f"{r['advertised_max_context']:>10,} {r['largest_served']:>14,} {fmt(r['ratio'], '.4f'):>6} "
                     f"{refused:>10} {step:>11} {leak:>5}")
        prev = r["largest_served"]
    return "\n".join(lines)


def capacity_verdict(rows: list[dict]) -> str:
    within = all(r["ratio"] is not None and abs(1 - r["ratio"]) <= CAPACITY_TOLERANCE for r in rows)
    refused = all(r["over_refused_properly"] for r in rows)
    steps = {rows[i]["largest_served"] - rows[i - 1]["largest_served"] for i in range(1, len(rows))}
    linear = len(steps) <= 1
    return (f"within {CAPACITY_TOLERANCE:.0%} of total blocks x block size: {'PASS' if within else 'FAIL'}; "
            f"one token over refused (400 context_length_exceeded): {'PASS' if refused else 'FAIL'}; "
            f"equal step per memserver (linear): {'PASS' if linear else 'FAIL'} {sorted(steps)}")


def _pyplot():
    from loadtest import plots  # imports matplotlib with the Agg backend; only when plotting

    return plots


def decode_plot(summary: list[dict], path: Path) -> Path:
    plots = _pyplot()
    plt = plots.plt
    contexts = sorted({s["context"] for s in summary})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        rows = [s for s in summary if s["context"] == ctx]
        local = next((s for s in rows if s["num_memservers"] == 0), None)
        zero = [s for s in rows if s["fraction"] == 0 and s["num_memservers"] > 0]
        for m in sorted({s["num_memservers"] for s in rows if s["num_memservers"] > 0}):
            series = sorted([*zero, *[s for s in rows if s["num_memservers"] == m and s["fraction"] > 0]],
                            key=lambda s: s["fraction"])
            ax.plot([s["fraction"] * 100 for s in series], [s["ratio_vs_local"] for s in series], marker="o",
                    label=f"{m} memserver(s)")
        if local is not None:
            ax.axhline(1.0, color="gray", lw=1, label="all-local")
        ax.axhline(TARGET_RATIO, color="red", ls="--", lw=1, label=f"target {TARGET_RATIO}x at 75%")
        ax.set_xlabel("% of KV on memservers (planned)")
        ax.set_ylabel("decode ITL / all-local ITL (median)")
        ax.set_title(f"context {ctx:,} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return plots.save_figure(fig, path)


def capacity_plot(rows: list[dict], path: Path) -> Path:
    plots = _pyplot()
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ms = [r["num_memservers"] for r in rows]
    ax.plot(ms, [r["theoretical_tokens"] for r in rows], "k--", label="total blocks x block size")
    ax.plot(ms, [r["advertised_max_context"] for r in rows], marker="s", label="advertised (/cluster)")
    ax.plot(ms, [r["largest_served"] for r in rows], marker="o", label="largest served")
    ax.set_xticks(ms)
    ax.set_xlabel("memservers")
    ax.set_ylabel("tokens (prompt + max_tokens)")
    ax.set_title("max servable context vs memservers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return plots.save_figure(fig, path)
