"""A local kvmesh cluster as child processes: router, then memservers and workers; stopped in the
reverse order (workers drain and deregister first). Used by `kvmesh up`, load-test scenarios and
tests. On ready it writes <log_dir>/cluster.json (URLs, pids, ports) for other tools."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from services.launch import probe
from services.launch.config import LaunchConfig
from services.launch.procs import Child, kvmesh_argv, spawn, stop_children
from services.launch.progress import Progress
from services.launch.supervisor import RestartBudget
from services.launch.view import ClusterView
from services.runtime.auth import API_KEY_ENV
from services.runtime.host import default_logits_threads, default_num_threads
from services.runtime.ports import free_port
from services.runtime.tls import write_trust_bundle


class ClusterError(RuntimeError):
    """A child failed to start or died; the message carries its log tail."""


class LocalCluster:
    def __init__(self, config: LaunchConfig, log_dir: Path, progress: Progress | None = None):
        self.config = config
        self.log_dir = log_dir
        self.progress = progress or Progress(quiet=True)
        self.router: Child | None = None
        self.workers: list[Child] = []
        self.memservers: list[Child] = []
        self._num_memservers_started = 0
        self._worker_starts: list[int] = []  # per worker slot: how many processes it has had
        # With HTTPS: the PEM file this process and its children verify the router's certificate with
        self.trust_file: Path | None = None

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- start -------------------------------------------------------------------------------
    @property
    def children(self) -> list[Child]:
        return [c for c in (self.router, *self.memservers, *self.workers) if c is not None]

    @property
    def url(self) -> str:
        assert self.router is not None, "cluster not started"
        return self.router.url

    def _spawn(self, name: str, kind: str, cli_args: list[str], port: int) -> Child:
        # Co-located processes share the cores: OpenMP threads that spin after each parallel region
        # would steal them from each other (a per-layer worker <-> memserver round trip paid ~50 ms).
        env = {"KVMESH_CLUSTER_TOKEN": self.config.cluster_token,
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               # The keys reach the router through its environment: argv is visible to every local user.
               API_KEY_ENV: ",".join(self.config.api_keys)}
        if self.trust_file is not None:  # OpenSSL's own variable: aiohttp's default context reads it
            env["SSL_CERT_FILE"] = str(self.trust_file)
        scheme = "https" if kind == "router" and self.config.tls is not None else "http"
        child = spawn(name, kind, kvmesh_argv(*cli_args), self.log_dir, port, self.config.host, env, scheme)
        return child

    def _check_alive(self) -> None:
        for child in self.children:
            if not child.alive:
                raise ClusterError(f"{child.name} exited with status {child.popen.returncode}; "
                                   f"last lines of {child.log_path}:\n{child.log_tail()}")

    def start(self) -> None:
        c = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = c.port or free_port(c.host)
        args = ["router", "--host", c.host, "--port", str(port)]
        if c.tool_call_parser is not None:
            args += ["--tool-call-parser", c.tool_call_parser]
        if c.reasoning_parser is not None:
            args += ["--reasoning-parser", c.reasoning_parser]
        if c.allow_runtime_lora_updating:
            args += ["--allow-runtime-lora-updating"]
        if c.return_tokens_as_token_ids:
            args += ["--return-tokens-as-token-ids"]
        if c.responses_store_size is not None:
            args += ["--responses-store-size", str(c.responses_store_size)]
        if c.tls is not None:
            args += self._tls_arguments()
        self.router = self._spawn("router", "router", args, port)
        self.progress.wait(f"router on :{port}", lambda: probe.get_json(self.url + "/health")[0] == 200,
                           60, self._check_alive)
        # memservers learn the KV block geometry from the first worker: all start now, they join after it
        for _ in range(c.num_memservers):
            self.add_memserver()
        for i in range(c.num_workers):
            self.workers.append(self._start_worker(i))
        self.progress.wait(f"{c.num_workers} worker(s) loading model {c.model!r} and joining",
                           lambda: probe.num_live_workers(self.url) >= c.num_workers, c.ready_timeout_s,
                           self._check_alive, interval_s=0.2)
        if c.num_memservers:
            self.wait_memservers(c.num_memservers)
        self.progress.wait("router /ready", lambda: probe.get_json(self.url + "/ready")[0] == 200, 30,
                           self._check_alive)
        self.write_manifest()

    def _tls_arguments(self) -> list[str]:
        """The router's --ssl-* flags; and the trust its clients here need (router-trust.pem): the
        CAs this process trusts plus the router's certificate, so a self-signed one works too. This
        process's own probes (urllib) read $SSL_CERT_FILE as its children do."""
        tls = self.config.tls
        assert tls is not None
        args = ["--ssl-certfile", str(Path(tls.certfile).resolve()), "--ssl-keyfile", str(Path(tls.keyfile).resolve())]
        if tls.ca_certs is not None:
            args += ["--ssl-ca-certs", str(Path(tls.ca_certs).resolve()), "--ssl-cert-reqs", str(tls.cert_reqs)]
        self.trust_file = write_trust_bundle(tls.certfile, self.log_dir / "router-trust.pem")
        os.environ["SSL_CERT_FILE"] = str(self.trust_file)
        return args

    def _start_worker(self, index: int) -> Child:
        c = self.config
        port = free_port(c.host)
        if index == len(self._worker_starts):
            self._worker_starts.append(0)
        self._worker_starts[index] += 1
        # A replacement is a new owner (worker0-2, ...): memory servers never mistake the blocks
        # its predecessor left for its own.
        starts = self._worker_starts[index]
        worker_id = f"worker{index}" if starts == 1 else f"worker{index}-{starts}"
        args = ["worker", "--model", c.model, "--router", self.url, "--host", c.host, "--port", str(port),
                "--block-size", str(c.block_size), "--dtype", c.dtype, "--worker-id", worker_id]
        if c.served_model_name is not None:
            args += ["--served-model-name", c.served_model_name, *c.served_model_aliases]
        if c.worker_kv_blocks is not None:
            args += ["--kv-blocks", str(c.worker_kv_blocks)]
        if c.max_model_len is not None:
            args += ["--max-model-len", str(c.max_model_len)]
        if c.max_num_seqs is not None:
            args += ["--max-num-seqs", str(c.max_num_seqs)]
        if c.max_num_batched_tokens is not None:
            args += ["--max-num-batched-tokens", str(c.max_num_batched_tokens)]
        if not c.enable_prefix_caching:
            args += ["--no-enable-prefix-caching"]
        if c.scheduling_policy != "fcfs":
            args += ["--scheduling-policy", c.scheduling_policy]
        if c.chat_template is not None:  # a file by its absolute path (workers may start elsewhere), else the text
            is_file = Path(c.chat_template).expanduser().is_file()
            args += ["--chat-template", str(Path(c.chat_template).expanduser().resolve()) if is_file else c.chat_template]
        if c.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", c.kv_cache_dtype]
        if c.speculative_config is not None:
            args += ["--speculative-config", c.speculative_config]
        if c.enable_lora:
            args += ["--enable-lora", "--max-lora-rank", str(c.max_lora_rank)]
        if c.lora_modules:
            args += ["--lora-modules", *(f"{name}={path}" for name, path in c.lora_modules)]
        if c.generation_config == "vllm":
            args += ["--generation-config", "vllm"]
        elif c.generation_config != "auto":  # a directory
            args += ["--generation-config", str(Path(c.generation_config).resolve())]
        # Workers of one host share its cores (default_num_threads leaves one spare).
        threads = c.worker_threads if c.worker_threads is not None else default_num_threads(c.num_workers)
        args += ["--num-threads", str(threads),
                 "--logits-threads", str(default_logits_threads(threads, c.num_workers))]
        return self._spawn(worker_id, "worker", args, port)

    def add_memserver(self) -> Child:
        """Start one more CPU memserver (at start-up, or later: a memserver joining under load)."""
        c = self.config
        port = free_port(c.host)
        name = f"memserver{self._num_memservers_started}"
        self._num_memservers_started += 1
        child = self._spawn(name, "memserver", ["memserver", "--router", self.url, "--device", "cpu",
                                                "--capacity", c.memserver_capacity, "--host", c.host,
                                                "--port", str(port), "--memserver-id", name], port)
        self.memservers.append(child)
        return child

    def wait_memservers(self, num_memservers: int, timeout_s: float = 120.0) -> None:
        """Until the router lists them in /cluster (without that route: until each listens on its port)."""
        c = self.config

        def joined() -> bool:
            status, body = probe.get_json(self.url + "/cluster", c.cluster_token)
            if status == 200 and body is not None:  # the router's own word: registered memservers
                return len([m for m in body.get("memservers") or [] if not m.get("leaving")]) >= num_memservers
            return all(probe.port_is_open(c.host, m.port) for m in self.memservers if m.alive)

        self.progress.wait(f"{num_memservers} memserver(s) joining", joined, timeout_s, self._check_alive, 0.2)

    def replace(self, dead: Child) -> Child:
        """Start another worker or memserver in the place of one that died; the router forgets the
        dead one now (a worker's blocks on memory servers are freed at their next heartbeat)."""
        if dead.kind == "worker":
            index = self.workers.index(dead)
            path = f"/internal/workers/{dead.name}"
        elif dead.kind == "memserver":
            self.memservers.remove(dead)
            path = f"/internal/memservers/{dead.name}"
        else:
            raise ValueError(f"{dead.name} ({dead.kind}) cannot be replaced")
        probe.get_json(self.url + path, self.config.cluster_token, method="DELETE")  # best effort
        if dead.kind == "worker":
            child = self.workers[index] = self._start_worker(index)
        else:
            child = self.add_memserver()
        self.write_manifest()
        return child

    def replace_dead(self, budget: RestartBudget) -> list[tuple[Child, Child]]:
        """Replace every worker and memserver that died: (dead, replacement) pairs. ClusterError,
        with the log tail, when the cluster must stop instead: its router died, or one kind of
        process crash-loops (services.launch.supervisor)."""
        replaced = []
        for dead in [c for c in self.children if not c.alive]:
            if dead.kind == "router" or not budget.allow(dead.kind):
                why = "" if dead.kind == "router" else (
                    f" ({budget.max_restarts} {dead.kind}s already replaced in the last {budget.window_s:.0f} s)")
                raise ClusterError(f"{dead.name} exited with status {dead.popen.returncode}{why}; "
                                   f"last lines of {dead.log_path}:\n{dead.log_tail()}")
            replaced.append((dead, self.replace(dead)))
        return replaced

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> int:
        """Stop one child abruptly (a memserver failing under load); its exit status."""
        child.signal_group(sig)
        return child.popen.wait(30)

    # ---- run / stop --------------------------------------------------------------------------
    def view(self) -> ClusterView:
        return probe.cluster_view(self.url, self.config.cluster_token, [w.url for w in self.workers if w.alive])

    def stop(self) -> dict[str, int]:
        """Workers first (they drain and deregister), then memservers, then the router."""
        timeout = self.config.stop_timeout_s
        codes = stop_children(self.workers, timeout)
        codes |= stop_children(self.memservers, timeout)
        if self.router is not None:
            codes |= stop_children([self.router], timeout)
        return codes

    def kill_all(self) -> None:
        for child in self.children:
            child.signal_group(signal.SIGKILL)

    def write_manifest(self) -> Path:
        path = self.log_dir / "cluster.json"
        data = {
            "url": self.url, "launcher_pid": os.getpid(), "log_dir": str(self.log_dir),
            "processes": [{"name": c.name, "kind": c.kind, "pid": c.pid, "port": c.port, "url": c.url,
                           "log": str(c.log_path)} for c in self.children],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)  # readers never see half a file
        return path
