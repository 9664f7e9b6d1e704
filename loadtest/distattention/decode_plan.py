"""Benchmark 1's plan, pure: which clusters and workers measure decode time at a given fraction of
the KV on memservers. The fraction is set by the worker's local pool: the engine spills the oldest
full blocks and keeps the newest local, so a pool of (1 - f) * C / block_size blocks (+ a tail for
decoding) leaves about f of a C-token context on memservers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtest.distattention.cluster import ClusterSpec, WorkerSpec

TINY_BLOCK_BYTES = 32 * 1024  # tiny model, fp32, block 16: 2 (K,V) * 4 layers * 16 * 2 kv heads * 32 dims * 4 B
LOCAL = "local"
TAIL_BLOCKS = 2  # room for the decode tail beyond the planned local share


@dataclass(frozen=True, slots=True)
class DecodeCase:
    label: str  # "local" | "m1/f75"
    cluster: str  # ClusterSpec.name
    worker: str  # worker id = served model name
    num_memservers: int  # memservers the worker may spill to (0 for the all-local baseline)
    fraction: float  # planned share of the context on memservers
    num_kv_blocks: int


@dataclass(frozen=True, slots=True)
class DecodePlan:
    context: int
    decode_tokens: int
    clusters: tuple[ClusterSpec, ...]
    cases: tuple[DecodeCase, ...]
    memserver_capacity: str


def total_blocks(context: int, decode_tokens: int, block_size: int) -> int:
    return math.ceil((context + decode_tokens) / block_size)


def local_blocks(context: int, fraction: float, decode_tokens: int, block_size: int) -> int:
    if fraction <= 0:
        return total_blocks(context, decode_tokens, block_size) + TAIL_BLOCKS  # never spills
    return max(4, math.ceil((1 - fraction) * context / block_size) + TAIL_BLOCKS)


def memserver_capacity(context: int, max_fraction: float, decode_tokens: int, block_size: int,
                       block_bytes: int = TINY_BLOCK_BYTES, num_shares: int = 1) -> str:
    """Each memserver holds 1/num_shares of the remote part at the largest fraction, plus a spill
    batch of slack. num_shares=1: any one server holds a whole sequence (the ledger keeps a sequence
    on the servers already holding it, so one request's blocks land on one server; the per-server
    split is printed with each request). num_shares=M > 1: a sequence spreads over the M servers."""
    remote = math.ceil(max_fraction * (context + decode_tokens) / block_size)
    slack = max(64, remote // 8)
    return f"{math.ceil((math.ceil(remote / num_shares) + slack) * block_bytes / 1024)}KiB"


def decode_plan(context: int, fractions: list[float], memservers: list[int], decode_tokens: int,
                block_size: int = 16, worker_threads: int | None = None, with_local: bool = True,
                env: tuple[tuple[str, str], ...] = (), memserver_threads: int | None = None,
                spread: bool = False) -> DecodePlan:
    """One cluster per memserver count. The all-local baseline (--no-remote-kv) and f=0 (remote on,
    pool big enough: nothing spills, so the memserver count is moot) live in the first cluster.
    spread: size each of a cluster's M memservers for 1/M of the remote part, so one sequence
    spreads over all of them (the fan-out cost) instead of fitting on one."""
    if not memservers or min(memservers) < 1:
        raise ValueError(f"memserver counts must be >= 1, got {memservers}")
    if any(not 0 <= f < 1 for f in fractions):
        raise ValueError(f"fractions must be in [0, 1), got {fractions}")
    capacity = memserver_capacity(context, max(fractions, default=0), decode_tokens, block_size)
    clusters, cases = [], []
    for i, m in enumerate(memservers):
        name = f"m{m}"
        workers = []
        if i == 0 and with_local:
            n = local_blocks(context, 0, decode_tokens, block_size)
            workers.append(WorkerSpec(LOCAL, n, remote_kv=False))
            cases.append(DecodeCase(LOCAL, name, LOCAL, 0, 0.0, n))
        for f in fractions:
            if f == 0 and i > 0:
                continue
            worker = f"f{round(f * 100)}"
            n = local_blocks(context, f, decode_tokens, block_size)
            workers.append(WorkerSpec(worker, n))
            cases.append(DecodeCase(f"{name}/{worker}", name, worker, m, f, n))
        cluster_capacity = (memserver_capacity(context, max(fractions, default=0), decode_tokens, block_size,
                                               num_shares=m) if spread else capacity)
        clusters.append(ClusterSpec(name, tuple(workers), m, cluster_capacity, block_size, worker_threads,
                                    memserver_threads=memserver_threads, env=env))
    return DecodePlan(context, decode_tokens, tuple(clusters), tuple(cases), capacity)
