"""Start real kvmesh processes on loopback for end-to-end tests (and anyone else's).

    with running_cluster(tmp_dir, num_workers=1) as cluster:
        cluster.router.url ...; worker_stats(cluster.workers[0])
        wait_zero_used_blocks(cluster.workers)

Every process logs to a file in the log dir; `Cluster.log_tails()` gathers them, and
tests/e2e/conftest.py attaches them to the report of a failed test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import json
import urllib.error
import urllib.request

from services.launch import probe
from services.runtime.ports import free_port

TOKEN = "e2e-cluster-token"
TOKEN_HEADER = {"X-Kvmesh-Cluster-Token": TOKEN}
REPO = Path(__file__).resolve().parents[2]
ACTIVE: list["Cluster"] = []  # clusters alive right now, for failure reports


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, num_lines: int = 80) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it overstays; returns the exit status."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        if self.alive:
            self.popen.kill()
        return self.popen.wait(30)


def _spawn(name: str, module_args: list[str], log_dir: Path, url: str) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "KVMESH_CLUSTER_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        popen = subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO, env=env,
                                 stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Proc(name, popen, log_path, url)


def start_router(log_dir: Path, *args: str, name: str = "router") -> Proc:
    port = free_port()
    return _spawn(name, ["services.router", "--port", str(port), "--heartbeat-timeout", "2", *args], log_dir,
                  f"http://127.0.0.1:{port}")


def start_worker(log_dir: Path, router_url: str, *args: str, model: str = "tiny", name: str = "worker") -> Proc:
    port = free_port()
    return _spawn(name, ["services.worker", "--model", model, "--router", router_url, "--port", str(port),
                         "--heartbeat-interval", "0.5", *args], log_dir, f"http://127.0.0.1:{port}")


def start_memserver(log_dir: Path, router_url: str, *args: str, capacity: str = "16MiB",
                    name: str = "memserver") -> Proc:
    port = free_port()
    return _spawn(name, ["services.memserver", "--router", router_url, "--capacity", capacity, "--http-port",
                         str(port), "--memserver-id", name, "--heartbeat-interval", "0.5", *args], log_dir,
                  f"http://127.0.0.1:{port}")


def wait_for(predicate, timeout: float, what: str, procs: list[Proc] = (), interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        for p in procs:
            if not p.alive:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n"
                                   f"{p.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A plain GET (stdlib: works in sync tests and helpers); status 0 when unreachable."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5.0) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _get_json(url: str, headers: dict | None = None) -> tuple[int, dict | None]:
    status, body = get(url, headers)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def num_live_workers(router: Proc) -> int:
    status, body = _get_json(router.url + "/ready")
    return body["num_live_workers"] if body else 0


def router_workers(router: Proc) -> list[dict]:
    status, body = _get_json(router.url + "/internal/workers", TOKEN_HEADER)
    assert status == 200, body
    return body["workers"]


def worker_stats(worker: Proc) -> dict:
    status, body = _get_json(worker.url + "/internal/stats", TOKEN_HEADER)
    assert status == 200, f"{worker.name} stats: HTTP {status}"
    return body


def wait_zero_used_blocks(procs: list[Proc], timeout: float = 3.0) -> None:
    """Workers' and memservers' own block accounting (both serve /internal/stats) reaches zero."""
    for p in procs:
        if p.alive:
            wait_for(lambda: worker_stats(p)["num_used_blocks"] == 0, timeout, f"{p.name} to free its KV blocks")


def cluster_view(router: Proc) -> dict:
    status, body = _get_json(router.url + "/cluster")
    assert status == 200, body
    return body


@dataclass
class Cluster:
    log_dir: Path
    router: Proc
    workers: list[Proc] = field(default_factory=list)
    memservers: list[Proc] = field(default_factory=list)

    @property
    def procs(self) -> list[Proc]:
        return [self.router, *self.workers, *self.memservers]

    def add_memserver(self, *args: str, capacity: str = "16MiB") -> Proc:
        memserver = start_memserver(self.log_dir, self.router.url, *args, capacity=capacity,
                                    name=f"memserver{len(self.memservers)}")
        self.memservers.append(memserver)
        return memserver

    def wait_memservers(self, num: int, timeout: float = 60.0) -> None:
        watched = [p for p in self.procs if p.alive]
        wait_for(lambda: len(cluster_view(self.router)["memservers"]) == num, timeout, f"{num} memservers", watched)

    def reset_prefix_caches(self) -> None:
        """Workers forget their cached prefixes (those on memory servers hold blocks there)."""
        for worker in self.workers:
            if worker.alive:
                status, body = probe.reset_prefix_cache(worker.url, TOKEN)
                assert status == 200, f"{worker.name} reset_prefix_cache: HTTP {status} {body}"

    def wait_zero_used_blocks(self, timeout: float = 5.0) -> None:
        """Every process's own accounting, then the router's ledger, show no block in use once the
        workers have forgotten their cached prefixes."""
        wait_zero_used_blocks(self.workers, timeout)  # streams end before their blocks are freed
        self.reset_prefix_caches()
        wait_zero_used_blocks([*self.workers, *self.memservers], timeout)
        wait_for(lambda: not cluster_view(self.router)["lent"], timeout, "the ledger to show nothing lent")

    @contextlib.contextmanager
    def openai_client(self):
        """The official client on the router; leaving, every process shows no block in use."""
        import openai

        with openai.OpenAI(base_url=self.router.url + "/v1", api_key="unused", max_retries=0) as client:
            yield client
        self.wait_zero_used_blocks()

    def add_worker(self, *args: str, model: str = "tiny") -> Proc:
        worker = start_worker(self.log_dir, self.router.url, *args, model=model, name=f"worker{len(self.workers)}")
        self.workers.append(worker)
        return worker

    def wait_ready(self, num_workers: int | None = None, timeout: float = 120.0) -> None:
        want = sum(w.alive for w in self.workers) if num_workers is None else num_workers
        watched = [p for p in self.procs if p.alive]  # not the ones a test already stopped
        wait_for(lambda: num_live_workers(self.router) >= want, timeout, f"{want} live workers", watched)

    def log_tails(self) -> str:
        return "\n".join(f"----- {p.name} (rc={p.popen.poll()}) -----\n{p.log_tail()}" for p in self.procs)

    def stop(self) -> dict[str, int]:
        """Workers first (they free and deregister), memservers, then the router; name -> exit status."""
        return {p.name: p.terminate() for p in [*self.workers, *self.memservers, self.router]}


@contextlib.contextmanager
def running_cluster(log_dir: Path, num_workers: int = 1, router_args: tuple[str, ...] = (),
                    worker_args: tuple[str, ...] = (), num_memservers: int = 0, memserver_capacity: str = "16MiB"):
    cluster = Cluster(log_dir, start_router(log_dir, *router_args))
    ACTIVE.append(cluster)
    try:
        wait_for(lambda: _get_json(cluster.router.url + "/health")[0] == 200, 30, "router /health", cluster.procs)
        for _ in range(num_workers):
            cluster.add_worker(*worker_args)
        for _ in range(num_memservers):
            cluster.add_memserver(capacity=memserver_capacity)
        if num_workers:
            cluster.wait_ready()
        if num_memservers:
            cluster.wait_memservers(num_memservers)
        yield cluster
    finally:
        ACTIVE.remove(cluster)
        for p in [*cluster.workers, *cluster.memservers, cluster.router]:
            if p.alive:
                p.terminate()


async def wait_zero_used_blocks_async(workers: list[Proc], timeout: float = 3.0) -> None:
    """From async tests: polls on a thread so the event loop keeps running (and closing sockets)."""
    import asyncio

    await asyncio.to_thread(wait_zero_used_blocks, workers, timeout)
