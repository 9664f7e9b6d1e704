"""What a kvmesh cluster holds: capacity and used KV blocks, from the router's `GET /cluster` when
it has one, else from each worker's `/internal/stats`. Pure: parsing only, no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class ClusterView:
    source: str  # "/cluster" | "worker_stats"
    num_workers: int
    num_memservers: int
    block_size: int
    num_total_blocks: int
    num_used_blocks: int
    max_context_tokens: int | None = None  # one sequence: its worker's pool plus every memserver (/cluster)

    @property
    def capacity_tokens(self) -> int:
        return self.num_total_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        return (self.num_total_blocks - self.num_used_blocks) * self.block_size

    def to_json(self) -> dict:
        return {**asdict(self), "capacity_tokens": self.capacity_tokens, "free_tokens": self.free_tokens}

    def describe(self) -> str:
        longest = "" if self.max_context_tokens is None else f", longest context {self.max_context_tokens:,} tokens"
        return (f"{self.num_workers} worker(s), {self.num_memservers} memserver(s); KV capacity "
                f"{self.capacity_tokens:,} tokens ({self.num_total_blocks:,} blocks x {self.block_size}){longest}, "
                f"{self.num_used_blocks:,} blocks used [from {self.source}]")


def _total(entry: dict) -> int:
    return int(entry.get("num_total_blocks", entry.get("num_blocks", 0)))


def _used(entry: dict) -> int:
    if "num_used_blocks" in entry:
        return int(entry["num_used_blocks"])
    if "num_free_blocks" in entry:
        return _total(entry) - int(entry["num_free_blocks"])
    return 0


def view_from_worker_stats(stats: list[dict]) -> ClusterView:
    """From the workers' /internal/stats bodies (num_total_blocks, num_used_blocks, block_size)."""
    block_size = stats[0]["block_size"] if stats else 0
    return ClusterView("worker_stats", len(stats), 0, block_size,
                       sum(int(s["num_total_blocks"]) for s in stats), sum(_used(s) for s in stats))


def view_from_cluster_json(body: dict) -> ClusterView:
    """From the router's /cluster body: per-node `num_blocks` (or `num_total_blocks`) and
    `num_used_blocks` (or `num_free_blocks`); top-level totals win where present."""
    # A worker the router finds silent is presumed gone: its last report is not capacity or use.
    workers = [w for w in body.get("workers") or [] if not w.get("silent")]
    memservers = body.get("memservers") or []
    nodes = [*workers, *memservers]
    block_size = int(body.get("block_size") or next((n["block_size"] for n in nodes if n.get("block_size")), 0))
    total = body.get("num_total_blocks")
    if total is None:
        total = sum(_total(n) for n in nodes)
    used = body.get("num_used_blocks")
    if used is None:
        used = _used(body) if "num_free_blocks" in body else sum(_used(n) for n in nodes)
    max_context = body.get("max_context_tokens")
    return ClusterView("/cluster", len(workers), len(memservers), block_size, int(total), int(used),
                       None if max_context is None else int(max_context))
