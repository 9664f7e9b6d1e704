"""vLLM's Prometheus metric names, beside kvmesh's own: the dashboards, alerts and autoscalers
written for a vLLM server (its Grafana board, KEDA on vllm:num_requests_waiting, gateways that
read vllm:kv_cache_usage_perc) work against the router unchanged. Labelled by model_name, the
served (base) model's name, as vLLM's; the same measurements as the kvmesh_* metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.router.registry import WorkerRegistry

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # vLLM's for TTFT and end-to-end latency
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 5M tokens


class VllmLoadCollector:
    """Scheduler state and KV usage summed over each model's live workers, read at scrape time."""

    def __init__(self, workers: WorkerRegistry):
        self._workers = workers

    def collect(self):
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                    labels=["model_name"])
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                  labels=["model_name"])
        legacy_usage = GaugeMetricFamily("vllm:gpu_cache_usage_perc",
                                         "KV-cache usage. 1 means 100 percent usage (vLLM's older name).",
                                         labels=["model_name"])
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                          labels=["model_name"])
        totals: dict[str, list[int]] = {}  # model -> [running, waiting, used blocks, total blocks, preemptions]
        for state in self._workers.live():
            if state.load is None:
                continue
            t = totals.setdefault(state.info.model_name, [0, 0, 0, 0, 0])
            t[0] += state.load.num_running
            t[1] += state.load.num_waiting
            t[2] += state.load.num_total_blocks - state.load.num_free_blocks
            t[3] += state.load.num_total_blocks
            t[4] += state.load.num_preemptions
        for model, (num_running, num_waiting, used, total, num_preempted) in sorted(totals.items()):
            running.add_metric([model], num_running)
            waiting.add_metric([model], num_waiting)
            usage.add_metric([model], used / total if total else 0.0)
            legacy_usage.add_metric([model], used / total if total else 0.0)
            preemptions.add_metric([model], num_preempted)
        return [running, waiting, usage, legacy_usage, preemptions]


class VllmRequestMetrics:
    """Per-request measurements under vLLM's names (recorded by services.router.metrics.RouterMetrics)."""

    def __init__(self, registry: CollectorRegistry, workers: WorkerRegistry):
        r, m = registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              m, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds (vLLM's older name).",
                              m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             m, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", m,
                                         registry=r)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               m, buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", m,
                                                   buckets=TOKEN_BUCKETS, registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.", m, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.", m, registry=r)
        r.register(VllmLoadCollector(workers))

    def count_prompt(self, model: str, usage: dict) -> None:
        prompt, cached = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
        self.prompt_tokens.labels(model).inc(prompt)
        self.request_prompt_tokens.labels(model).observe(prompt)
        self.request_generation_tokens.labels(model).observe(usage["completion_tokens"])
        self.prefix_queries.labels(model).inc(prompt)
        self.prefix_hits.labels(model).inc(cached)

    def inter_token(self, model: str, seconds: float) -> None:
        self.itl.labels(model).observe(seconds)
        self.tpot.labels(model).observe(seconds)


def finished_reason(reason: str | None) -> str:
    """vLLM's finished_reason label: stop, length or abort (a tool call ends as a stop)."""
    return reason if reason in ("stop", "length") else "abort"
