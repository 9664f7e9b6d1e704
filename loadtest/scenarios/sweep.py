"""Concurrency sweep: throughput and latency per concurrency level, on a given server or on local
clusters with 0, 2, ... memservers launched one after the other (same run, same machine)."""

from __future__ import annotations

import argparse
import asyncio

from loadtest import plots, report
from loadtest.scenarios.common import add_cluster_arguments, fixed_load, local_cluster, run_bench
from loadtest.workloads import Workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="an existing server; default: launch local clusters")
    parser.add_argument("--memservers", default="0", help="comma list of memserver counts to launch, e.g. 0,2")
    parser.add_argument("--concurrency", default="1,4,16", help="comma list")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    add_cluster_arguments(parser)


async def sweep(url: str, label: str, levels: list[int], args: argparse.Namespace) -> list[dict]:
    rows = []
    workload = Workload(input_len=args.input_len, output_len=args.output_len)
    for c in levels:
        rep, _ = await run_bench(url, workload, fixed_load(c, max(8, c * args.requests_per_client)))
        s = rep["summary"]
        print(report.table(s, f"{label} concurrency {c}"), flush=True)
        rows.append({"label": label, "concurrency": c, "summary": s})
    return rows


def main(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.concurrency.split(",")]
    rows: list[dict] = []
    if args.url:
        rows += asyncio.run(sweep(args.url, args.url, levels, args))
    else:
        for m in (int(x) for x in args.memservers.split(",")):
            with local_cluster(args, m, f"sweep-m{m}") as cluster:
                rows += asyncio.run(sweep(cluster.url, f"{m} memservers", levels, args))
    points: dict[str, list] = {}
    for r in rows:
        s = r["summary"]
        points.setdefault(r["label"], []).append((r["concurrency"], s["output_throughput"], (s["tpot_ms"] or {}).get("p50", 0)))
    args.out.mkdir(parents=True, exist_ok=True)
    plots.throughput_vs_concurrency(points, args.out / "throughput_vs_concurrency.png")
    report.write_json(args.out / "sweep.json", {"rows": rows})
    print(f"\n{'config':<16} {'conc':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TPOT p50':>9} {'E2E p50':>9} {'errors':>6}")
    for r in rows:
        s = r["summary"]
        print(f"{r['label']:<16} {r['concurrency']:>5} {s['request_throughput']:>8.2f} {s['output_throughput']:>10.1f} "
              f"{s['ttft_ms']['p50']:>9.1f} {s['tpot_ms']['p50']:>9.2f} {s['e2e_ms']['p50']:>9.1f} {s['num_failed']:>6}")
    print(f"\nwrote {args.out}/sweep.json, throughput_vs_concurrency.png")
    return 0
