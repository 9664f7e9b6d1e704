"""Prometheus metrics of one router app, on its own CollectorRegistry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.router.ledger import Ledger
from services.router.registry import WorkerRegistry
from services.router.vllm_metrics import VllmRequestMetrics, finished_reason

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerLoadCollector:
    """Per-worker gauges read from the registry at scrape time (no stale label sets)."""

    def __init__(self, workers: WorkerRegistry):
        self._workers = workers

    def collect(self):
        running = GaugeMetricFamily("kvmesh_worker_requests_running", "Running sequences per worker", labels=["worker"])
        waiting = GaugeMetricFamily("kvmesh_worker_requests_waiting", "Waiting sequences per worker", labels=["worker"])
        used = GaugeMetricFamily("kvmesh_worker_kv_blocks_used", "KV blocks in use per worker", labels=["worker"])
        free = GaugeMetricFamily("kvmesh_worker_kv_blocks_free", "Free KV blocks per worker", labels=["worker"])
        live = GaugeMetricFamily("kvmesh_worker_live", "1 if the worker is in rotation", labels=["worker"])
        proposed = CounterMetricFamily("kvmesh_worker_spec_decode_proposed_tokens",
                                       "Tokens proposed by speculative decoding, per worker", labels=["worker"])
        accepted = CounterMetricFamily("kvmesh_worker_spec_decode_accepted_tokens",
                                       "Proposed tokens the model agreed with, per worker", labels=["worker"])
        preemptions = CounterMetricFamily("kvmesh_worker_preemptions",
                                          "Sequences preempted for recompute (KV blocks ran out), per worker",
                                          labels=["worker"])
        remote_cached = GaugeMetricFamily(
            "kvmesh_worker_kv_blocks_remote_cached",
            "KV blocks a worker keeps on memory servers as a cached prefix no request uses (room when needed)",
            labels=["worker"])
        for state in self._workers.all():
            wid = state.info.worker_id
            live.add_metric([wid], 1.0 if self._workers.is_live(state) else 0.0)
            if state.load is None:
                continue
            running.add_metric([wid], state.load.num_running)
            waiting.add_metric([wid], state.load.num_waiting)
            used.add_metric([wid], state.load.num_total_blocks - state.load.num_free_blocks)
            free.add_metric([wid], state.load.num_free_blocks)
            proposed.add_metric([wid], state.load.num_spec_proposed)
            accepted.add_metric([wid], state.load.num_spec_accepted)
            remote_cached.add_metric([wid], state.load.num_remote_cached_blocks)
            preemptions.add_metric([wid], state.load.num_preemptions)
        return [running, waiting, used, free, live, proposed, accepted, remote_cached, preemptions]


class LedgerCollector:
    """Memory-server capacity and the borrow ledger, read at scrape time."""

    def __init__(self, ledger: Ledger):
        self._ledger = ledger

    def collect(self):
        total = GaugeMetricFamily("kvmesh_memserver_kv_blocks_total", "KV blocks per memory server", labels=["memserver"])
        free = GaugeMetricFamily("kvmesh_memserver_kv_blocks_free", "Free KV blocks per memory server",
                                 labels=["memserver"])
        lent = GaugeMetricFamily("kvmesh_kv_blocks_lent", "KV blocks a memory server holds for a worker",
                                 labels=["worker", "memserver"])
        for s in self._ledger.servers():
            total.add_metric([s.memserver_id], s.num_blocks)
            free.add_metric([s.memserver_id], s.num_free)
        for (worker, memserver), n in sorted(self._ledger.lent().items()):
            lent.add_metric([worker, memserver], n)
        return [total, free, lent]


class RouterMetrics:
    def __init__(self, workers: WorkerRegistry, ledger: Ledger | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvmesh_router_requests", "Client requests by endpoint and outcome",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("kvmesh_router_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvmesh_router_inter_token_latency_seconds", "Gap between deltas of one sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvmesh_router_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_prompt_tokens = Counter("kvmesh_router_prompt_tokens_cached",
                                            "Prompt tokens of finished requests whose KV came from a worker's prefix cache",
                                            registry=r)
        self.e2e = Histogram("kvmesh_router_e2e_request_latency_seconds", "Request arrival to its last byte",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("kvmesh_router_sequences_finished", "Sequences served whole, by finish_reason",
                                ["finish_reason"], registry=r)
        self.generation_tokens = Counter("kvmesh_router_generation_tokens", "Generated tokens", registry=r)
        self.inflight = Gauge("kvmesh_router_requests_inflight", "Client requests being served", registry=r)
        r.register(WorkerLoadCollector(workers))
        if ledger is not None:
            r.register(LedgerCollector(ledger))
        self.vllm = VllmRequestMetrics(r, workers)  # the same measurements under vLLM's names

    # model: the served (base) model's name, vLLM's model_name label
    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.vllm.ttft.labels(model).observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        self.itl.observe(seconds)
        self.vllm.inter_token(model, seconds)

    def generated(self, model: str, num_tokens: int) -> None:
        self.generation_tokens.inc(num_tokens)
        self.vllm.generation_tokens.labels(model).inc(num_tokens)

    def count_prompt(self, model: str, usage: dict) -> None:
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.cached_prompt_tokens.inc(usage["prompt_tokens_details"]["cached_tokens"])
        self.vllm.count_prompt(model, usage)

    def served(self, model: str, seconds: float, finish_reasons: list[str | None]) -> None:
        """A request answered whole (200): its end-to-end latency and each sequence's finish reason."""
        self.e2e.observe(seconds)
        self.vllm.e2e.labels(model).observe(seconds)
        for reason in finish_reasons:
            self.finished.labels(reason or "none").inc()
            self.vllm.success.labels(model, finished_reason(reason)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
