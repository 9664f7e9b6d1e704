"""The comparison as one PNG: per metric, kvmesh/peer per case, median with the min-max range over rounds."""

from __future__ import annotations

from pathlib import Path

from loadtest.plots import plt, save_figure  # Agg backend already chosen there
from loadtest.peer.compare import METRICS, case_title


def ratio_panels(cases: list[dict], path: Path, peer: str = "vLLM") -> Path:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 0.45 * len(cases) + 2.2), sharey=True)
    labels = [case_title(c) for c in cases]
    ys = list(range(len(cases)))
    for ax, m in zip(axes, METRICS):
        for y, case in zip(ys, cases):
            s = case["stats"][m.name]["ratio"]
            if s is None:
                continue
            good = s["median"] >= 1.0 if m.higher_is_better else s["median"] <= 1.0
            ax.errorbar([s["median"]], [y], xerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                        fmt="o", color="tab:green" if good else "tab:red", capsize=3)
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{m.name}\n({'higher' if m.higher_is_better else 'lower'} is better for kvmesh)",
                     fontsize="small")
        ax.set_xlabel(f"kvmesh / {peer}")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(ys, labels, fontsize="small")
    axes[0].invert_yaxis()
    return save_figure(fig, path)
