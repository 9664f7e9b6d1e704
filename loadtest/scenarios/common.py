"""Shared scenario plumbing: local clusters launched like `kvmesh up`, and one benchmark call."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from loadtest.bench import BenchConfig, benchmark
from loadtest.runner import Load, RunOptions
from loadtest.workloads import Workload
from services.launch.cluster import LocalCluster
from services.launch.config import LaunchConfig
from services.launch.progress import Progress
from services.runtime.auth import DEV_CLUSTER_TOKEN
from services.worker.engine.config import KV_CACHE_DTYPES


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("local cluster (as `kvmesh up`)")
    g.add_argument("--model", default="tiny")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--worker-kv-blocks", type=int, default=256)
    g.add_argument("--memserver-capacity", default="64MiB")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--worker-threads", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    g.add_argument("--speculative-config", default=None, metavar="JSON")
    g.add_argument("--out", type=Path, default=Path("loadtest-results"))


def launch_config(args: argparse.Namespace, num_memservers: int, log_dir: Path) -> LaunchConfig:
    return LaunchConfig(model=args.model, num_workers=args.workers, num_memservers=num_memservers,
                        memserver_capacity=args.memserver_capacity, worker_kv_blocks=args.worker_kv_blocks,
                        block_size=args.block_size, worker_threads=args.worker_threads, port=0, log_dir=log_dir,
                        cluster_token=DEV_CLUSTER_TOKEN, stop_timeout_s=20, kv_cache_dtype=args.kv_cache_dtype,
                        speculative_config=args.speculative_config)


def local_cluster(args: argparse.Namespace, num_memservers: int, name: str) -> LocalCluster:
    log_dir = (args.out / "logs" / f"{name}-{time.strftime('%H%M%S')}").resolve()
    print(f"== starting local cluster {name}: {num_memservers} memserver(s), logs in {log_dir}", flush=True)
    return LocalCluster(launch_config(args, num_memservers, log_dir), log_dir, Progress())


async def run_bench(url: str, workload: Workload, load: Load, progress: bool = True) -> tuple[dict, dict]:
    config = BenchConfig(url=url, workload=workload, load=load, options=RunOptions(show_progress=progress),
                         cluster_token=DEV_CLUSTER_TOKEN)
    return await benchmark(config)


def fixed_load(concurrency: int, num_requests: int) -> Load:
    return replace(Load(), concurrency=concurrency, num_requests=num_requests)
