"""Memservers joining or dying while load runs. Requests must not fail (errors == 0) and no KV
block may stay used afterwards."""

from __future__ import annotations

import argparse
import asyncio
import time

from loadtest import report
from loadtest.runner import Load
from loadtest.scenarios.common import add_cluster_arguments, local_cluster, run_bench
from loadtest.workloads import Workload, WorkloadKind
from services.launch.cluster import LocalCluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memservers", type=int, default=2, help="memservers at start")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--at", type=float, default=10.0, help="seconds into the load when the event happens")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--long-context-len", type=int, default=6000, help="beyond one worker: uses memservers")
    add_cluster_arguments(parser)


async def _load_with_event(cluster: LocalCluster, args: argparse.Namespace, event) -> tuple[dict, dict]:
    workload = Workload(WorkloadKind.LONG_CONTEXT, input_len=256, output_len=32,
                        long_context_len=args.long_context_len, long_fraction=0.3)
    load = Load(concurrency=args.concurrency, num_requests=None, duration_s=args.duration)
    bench = asyncio.create_task(run_bench(cluster.url, workload, load, progress=False))
    await asyncio.sleep(args.at)
    info = await asyncio.to_thread(event, cluster)
    rep, _ = await bench
    return rep, info


def join(cluster: LocalCluster) -> dict:
    before = cluster.view()
    cluster.add_memserver()
    t0 = time.monotonic()
    cluster.wait_memservers(len([m for m in cluster.memservers if m.alive]))
    return {"event": "memserver_joined", "join_s": time.monotonic() - t0,
            "capacity_tokens_before": before.capacity_tokens, "capacity_tokens_after": cluster.view().capacity_tokens}


def kill(cluster: LocalCluster) -> dict:
    victim = cluster.memservers[0]
    code = cluster.kill(victim)
    return {"event": "memserver_killed", "name": victim.name, "exit_status": code}


def run(args: argparse.Namespace, name: str, event) -> int:
    with local_cluster(args, args.memservers, name) as cluster:
        rep, info = asyncio.run(_load_with_event(cluster, args, event))
    s = rep["summary"]
    print(report.table(s, f"{name}: {info}"))
    report.write_json(args.out / f"{name}.json", {**rep, "event": info})
    ok = s["num_failed"] == 0 and s.get("cluster_check", {}).get("ok", False)
    print(f"{name}: {'PASS' if ok else 'FAIL'} (errors {s['errors'] or 0})")
    return 0 if ok else 1


def main_join(args: argparse.Namespace) -> int:
    return run(args, "memserver-join", join)


def main_kill(args: argparse.Namespace) -> int:
    return run(args, "memserver-kill", kill)
