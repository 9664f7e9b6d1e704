"""A benchmark cluster on loopback: one router, M CPU memservers and named workers, each worker
serving its own model name so a request picks its worker (`"model": "f75"`). Children are spawned
like `kvmesh up`'s (own process group, killed if we die) and always stopped: SIGTERM, then SIGKILL."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from services.launch import probe
from services.launch.cluster import ClusterError
from services.launch.procs import Child, kvmesh_argv, spawn, stop_children
from services.runtime.ports import free_port

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    name: str  # worker id and served model name
    num_kv_blocks: int
    remote_kv: bool = True


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    name: str
    workers: tuple[WorkerSpec, ...]
    num_memservers: int = 0
    memserver_capacity: str = "64MiB"
    block_size: int = 16
    worker_threads: int | None = None
    memserver_threads: int | None = None  # None: the memserver's default (every usable core)
    heartbeat_timeout_s: float = 15.0  # generous: 2 shared cores, long synchronous prefill steps
    env: tuple[tuple[str, str], ...] = ()  # extra environment of every process (e.g. OMP_WAIT_POLICY)


class BenchCluster:
    def __init__(self, spec: ClusterSpec, log_dir: Path, token: str):
        self.spec = spec
        self.log_dir = log_dir
        self.token = token
        self.router: Child | None = None
        self.memservers: list[Child] = []
        self.workers: dict[str, Child] = {}

    def __enter__(self) -> "BenchCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.router is not None, "cluster not started"
        return self.router.url

    @property
    def children(self) -> list[Child]:
        return [c for c in (self.router, *self.memservers, *self.workers.values()) if c is not None]

    def _spawn(self, name: str, kind: str, args: list[str], port: int) -> Child:
        # As `kvmesh up`: OpenMP threads of co-located processes sleep after a parallel region.
        env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **dict(self.spec.env),
               "KVMESH_CLUSTER_TOKEN": self.token}
        return spawn(name, kind, kvmesh_argv(*args), self.log_dir, port, HOST, env)

    def start(self, timeout_s: float = 300.0) -> None:
        s = self.spec
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port(HOST)
        self.router = self._spawn("router", "router", ["router", "--host", HOST, "--port", str(port),
                                                       "--heartbeat-timeout", str(s.heartbeat_timeout_s)], port)
        self._wait("router /health", lambda: probe.get_json(self.url + "/health")[0] == 200, 60)
        for i in range(s.num_memservers):
            port = free_port(HOST)
            name = f"memserver{i}"
            self.memservers.append(self._spawn(name, "memserver", [
                "memserver", "--router", self.url, "--capacity", s.memserver_capacity, "--host", HOST,
                "--http-port", str(port), "--memserver-id", name, "--heartbeat-interval", "0.5",
                *(["--num-threads", str(s.memserver_threads)] if s.memserver_threads is not None else [])], port))
        for w in s.workers:
            port = free_port(HOST)
            args = ["worker", "--model", "tiny", "--router", self.url, "--host", HOST, "--port", str(port),
                    "--block-size", str(s.block_size), "--kv-blocks", str(w.num_kv_blocks), "--worker-id", w.name,
                    "--served-model-name", w.name, "--heartbeat-interval", "0.5"]
            if not w.remote_kv:
                args.append("--no-remote-kv")
            if s.worker_threads is not None:
                args += ["--num-threads", str(s.worker_threads)]
            self.workers[w.name] = self._spawn(w.name, "worker", args, port)
        self._wait(f"{len(s.workers)} worker(s)", lambda: probe.num_live_workers(self.url) >= len(s.workers), timeout_s)
        self._wait(f"{s.num_memservers} memserver(s)", lambda: len(self.cluster()["memservers"]) >= s.num_memservers,
                   timeout_s)

    def _wait(self, what: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = next((c for c in self.children if not c.alive), None)
            if dead is not None:
                raise ClusterError(f"[{self.spec.name}] {dead.name} exited with {dead.popen.returncode} while "
                                   f"waiting for {what}; {dead.log_path}:\n{dead.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"[{self.spec.name}] timed out after {timeout_s:.0f}s waiting for {what}")
            time.sleep(0.2)

    def cluster(self) -> dict:
        status, body = probe.get_json(self.url + "/cluster", self.token)
        if status != 200 or body is None:
            raise ClusterError(f"[{self.spec.name}] GET /cluster: HTTP {status}")
        return body

    def stats(self, child: Child) -> dict | None:
        status, body = probe.get_json(child.url + "/internal/stats", self.token)
        return body if status == 200 else None

    def used_blocks(self) -> dict[str, int | None]:
        """Every process's own count of used blocks (None: unreachable), plus the router's ledger."""
        used = {c.name: (st or {}).get("num_used_blocks") for c in [*self.workers.values(), *self.memservers]
                for st in [self.stats(c)]}
        view = self.cluster()
        used["router:/cluster"] = view["num_used_blocks"]
        used["router:lent"] = sum(entry["num_blocks"] for entry in view["lent"])
        return used

    def wait_zero_used(self, timeout_s: float = 15.0) -> dict[str, int | None]:
        """Blocks are freed just after a stream ends and the ledger catches up on heartbeats: poll.
        The workers first forget their cached prefixes: on memory servers they hold blocks, and the
        next case (another worker, the memservers sized for one request) would wait on them."""
        for worker in self.workers.values():
            probe.reset_prefix_cache(worker.url, self.token)
        deadline = time.monotonic() + timeout_s
        while True:
            used = self.used_blocks()
            if all(v == 0 for v in used.values()) or time.monotonic() > deadline:
                return used
            time.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Workers first (they drain and free remote blocks), then memservers, then the router."""
        codes = stop_children(list(self.workers.values()), timeout_s)
        codes |= stop_children(self.memservers, timeout_s)
        if self.router is not None:
            codes |= stop_children([self.router], timeout_s)
        return codes
