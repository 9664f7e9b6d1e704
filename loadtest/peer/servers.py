"""The two servers under test, as context managers that always stop what they started
(SIGTERM to the process group, SIGKILL after a deadline; PR_SET_PDEATHSIG if we die first)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from services.launch import probe
from services.launch.cluster import ClusterError, LocalCluster
from services.launch.config import LaunchConfig
from services.launch.procs import Child, spawn, stop_children
from services.launch.progress import Progress
from services.runtime.auth import CLUSTER_TOKEN_ENV, DEV_CLUSTER_TOKEN
from services.runtime.ports import free_port

SERVED_MODEL_NAME = "tiny"
MAX_MODEL_LEN = 2048


@dataclass(frozen=True, slots=True)
class VllmConfig:
    python: Path  # the peer venv's interpreter
    peer_dir: Path
    model_dir: Path
    dtype: str
    log_dir: Path
    kv_cache_gib: int = 2
    host: str = "127.0.0.1"
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0


def vllm_env(peer_dir: Path, kv_cache_gib: int) -> dict[str, str]:
    """Loopback only, every cache and temp file inside the peer dir."""
    tmp = peer_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
            "VLLM_CACHE_ROOT": str(peer_dir / "cache" / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(peer_dir / "cache" / "inductor"), "TMPDIR": str(tmp),
            "VLLM_RPC_BASE_PATH": str(tmp), "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def vllm_argv(c: VllmConfig, port: int) -> list[str]:
    # the package's `vllm` console script fails (its distribution is named vllm-cpu); -m works
    return [str(c.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(c.model_dir),
            "--served-model-name", SERVED_MODEL_NAME, "--host", c.host, "--port", str(port),
            "--dtype", c.dtype, "--max-model-len", str(MAX_MODEL_LEN)]


class VllmServer:
    def __init__(self, config: VllmConfig, progress: Progress):
        self.config = config
        self.progress = progress
        self.child: Child | None = None

    @property
    def url(self) -> str:
        assert self.child is not None, "not started"
        return self.child.url

    @property
    def pids(self) -> list[int]:
        return [self.child.pid] if self.child else []

    def __enter__(self) -> "VllmServer":
        c = self.config
        c.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port(c.host)
        self.child = spawn(f"vllm-{c.dtype}", "vllm", vllm_argv(c, port), c.log_dir, port, c.host,
                           vllm_env(c.peer_dir, c.kv_cache_gib))
        try:
            self.progress.wait(f"vLLM ({c.dtype}) loading on :{port}",
                               lambda: probe.get_json(self.url + "/v1/models")[0] == 200,
                               c.ready_timeout_s, self._check_alive, interval_s=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_alive(self) -> None:
        if not self.child.alive:
            raise ClusterError(f"vLLM exited with status {self.child.popen.returncode}; last lines of "
                               f"{self.child.log_path}:\n{self.child.log_tail()}")

    def stop(self) -> dict[str, int]:
        return stop_children([self.child], self.config.stop_timeout_s) if self.child else {}

    def __exit__(self, *exc) -> None:
        self.stop()

    def dtype_seen(self) -> str | None:
        """The dtype vLLM's engine logged at start-up (e.g. torch.bfloat16)."""
        found = re.search(r"\bdtype=(torch\.\w+)", self.child.log_tail(100_000))
        return found.group(1) if found else None


def _group_cpu_s(pgids: set[int]) -> float:
    """CPU seconds (user + system) of every live process in these process groups."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:
            continue
        if int(fields[2]) in pgids:  # pgrp; utime and stime are fields 14 and 15 of stat
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def idle_cpu_percent(pgids: set[int], seconds: float = 3.0) -> float:
    """How busy a server keeps the CPUs while it has no requests (a spinning idle loop steals from the other)."""
    before = _group_cpu_s(pgids)
    time.sleep(seconds)
    return 100.0 * (_group_cpu_s(pgids) - before) / seconds


def kvmesh_cluster(model_dir: Path, dtype: str, log_dir: Path, worker_threads: int | None) -> LocalCluster:
    """`kvmesh up --model DIR --memservers 0 --dtype D` on a free port, as a context manager."""
    config = LaunchConfig(model=str(model_dir), num_memservers=0, dtype=dtype, worker_threads=worker_threads,
                          port=0, log_dir=log_dir, cluster_token=os.environ.get(CLUSTER_TOKEN_ENV) or DEV_CLUSTER_TOKEN,
                          stop_timeout_s=30.0)
    return LocalCluster(config, log_dir, Progress())
