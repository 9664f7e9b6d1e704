"""PNG plots with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from loadtest.client import RequestResult  # noqa: E402

_SERIES = (("TTFT", lambda r: r.ttft_s), ("TPOT", lambda r: r.tpot_s), ("E2E latency", lambda r: r.e2e_s))


def save_figure(fig, path: Path) -> Path:
    """Lay out, write the PNG, free the figure: the end of every plot here."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_cdfs(runs: dict[str, list[RequestResult]], path: Path) -> Path:
    """One panel per latency (TTFT, TPOT, E2E), one CDF line per run label."""
    fig, axes = plt.subplots(1, len(_SERIES), figsize=(5 * len(_SERIES), 4))
    for ax, (name, get) in zip(axes, _SERIES):
        for label, results in runs.items():
            values = sorted(v * 1000 for r in results if r.ok and (v := get(r)) is not None)
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def throughput_vs_concurrency(points: dict[str, list[tuple[int, float, float]]], path: Path) -> Path:
    """points: label -> [(concurrency, output tok/s, p50 TPOT ms)]."""
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    for label, series in points.items():
        series = sorted(series)
        xs = [c for c, _, _ in series]
        ax_tp.plot(xs, [tp for _, tp, _ in series], marker="o", label=label)
        ax_lat.plot(xs, [lat for _, _, lat in series], marker="o", label=label)
    for ax, ylabel in ((ax_tp, "output tokens/s"), (ax_lat, "p50 TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path)
