"""Long-context capacity: the longest prompt a cluster serves with 0, 1, 2, 3 CPU memservers
(binary search on prompt length, one request at a time, max_tokens small)."""

from __future__ import annotations

import argparse
import asyncio

from loadtest import report
from loadtest.scenarios.common import add_cluster_arguments, fixed_load, local_cluster, run_bench
from loadtest.workloads import Workload
from services.launch import probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memservers", default="0,1,2,3", help="comma list of memserver counts")
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=1 << 20, help="upper bound of the search")
    add_cluster_arguments(parser)


async def servable(url: str, num_tokens: int, output_len: int) -> bool:
    rep, _ = await run_bench(url, Workload(input_len=num_tokens, output_len=output_len), fixed_load(1, 1), False)
    return rep["summary"]["num_completed"] == 1


async def longest(url: str, capacity_tokens: int, args: argparse.Namespace) -> int:
    lo, hi = 0, min(args.max_len, 2 * capacity_tokens)  # lo servable, hi not (or the bound)
    if await servable(url, hi, args.output_len):
        return hi
    while hi - lo > max(16, hi // 100):
        mid = (lo + hi) // 2
        if await servable(url, mid, args.output_len):
            lo = mid
        else:
            hi = mid
    return lo


def main(args: argparse.Namespace) -> int:
    rows = []
    for m in (int(x) for x in args.memservers.split(",")):
        with local_cluster(args, m, f"longctx-m{m}") as cluster:
            view = cluster.view()
            n = asyncio.run(longest(cluster.url, view.capacity_tokens, args))
            after = probe.wait_zero_used_blocks(cluster.url, cluster.config.cluster_token)  # cached prefixes too
            rows.append({"num_memservers": m, "capacity_tokens": view.capacity_tokens, "longest_prompt": n,
                         "num_used_blocks_after": after.num_used_blocks})
            print(f"{m} memserver(s): capacity {view.capacity_tokens:,} tokens, longest servable prompt {n:,}, "
                  f"used blocks after {after.num_used_blocks}", flush=True)
    report.write_json(args.out / "long_context.json", {"rows": rows})
    return 0 if all(r["num_used_blocks_after"] == 0 for r in rows) else 1
