"""One benchmark (a target, a workload, a load) or an interleaved A/B comparison, as a report dict."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import aiohttp

from loadtest.client import RequestResult, Target
from loadtest.cluster_check import check_zero_used_blocks
from loadtest.metrics import Slo, ratios, summarize
from loadtest.prompts import PromptBuilder, PromptFormat, detect
from loadtest.runner import Load, RunOptions, run_load
from loadtest.workloads import Workload


@dataclass(frozen=True, slots=True)
class BenchConfig:
    url: str
    model: str | None = None
    workload: Workload = field(default_factory=Workload)
    load: Load = field(default_factory=Load)
    options: RunOptions = field(default_factory=RunOptions)
    slo: Slo = field(default_factory=Slo)
    prompt_format: PromptFormat = PromptFormat.AUTO
    api_key: str | None = None
    cluster_token: str | None = None  # for the zero-used-blocks check; None: skip it
    compare_url: str | None = None
    compare_rounds: int = 4


def open_session(api_key: str | None, limit: int) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, connect=10)
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=limit))


async def resolve_target(session: aiohttp.ClientSession, url: str, model: str | None, label: str) -> Target:
    target = Target(url, model or "", label)
    if model:
        return target
    async with session.get(target.base + "/models") as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200 or not body.get("data"):
            raise RuntimeError(f"no model listed at {target.base}/models (HTTP {resp.status})")
    return replace(target, model=body["data"][0]["id"])


def _config_json(config: BenchConfig) -> dict:
    out = asdict(config)
    out["workload"]["kind"] = config.workload.kind.value
    out["prompt_format"] = config.prompt_format.value
    out.pop("api_key", None)
    out.pop("cluster_token", None)
    return out


async def _finish(summary: dict, target: Target, config: BenchConfig) -> dict:
    if config.cluster_token is not None:
        summary["cluster_check"] = await check_zero_used_blocks(target.url, config.cluster_token)
    return summary


async def benchmark(config: BenchConfig) -> tuple[dict, dict[str, list[RequestResult]]]:
    """(report, label -> per-request results). With compare_url: interleaved A/B and ratios."""
    if config.compare_url:
        return await compare(config)
    async with open_session(config.api_key, limit=0) as session:
        target = await resolve_target(session, config.url, config.model, "A")
        prompts = await detect(session, target.base, target.model, config.prompt_format, config.load.seed,
                               config.workload.shared_prefix_len)
        results, wall_s = await run_load(session, target, config.workload, prompts, config.load, config.options)
    summary = await _finish(summarize(results, wall_s, config.slo), target, config)
    report = {"config": _config_json(config), "target": asdict(target), "prompt_format": prompts.format.value,
              "summary": summary, "finished_at": time.time()}
    return report, {target.url: results}


async def compare(config: BenchConfig) -> tuple[dict, dict[str, list[RequestResult]]]:
    """Same requests to A and B in alternating rounds (A, B, A, B, ...): both see the same machine
    conditions over time, and one never competes with the other for the CPUs."""
    load = config.load
    if load.num_requests is None:
        raise ValueError("--compare needs --num-requests (rounds split the same requests between A and B)")
    num_rounds = max(1, min(config.compare_rounds, load.num_requests))
    async with open_session(config.api_key, limit=0) as session:
        targets = [await resolve_target(session, config.url, config.model, "A"),
                   await resolve_target(session, config.compare_url, config.model, "B")]
        builders: list[PromptBuilder] = [await detect(session, t.base, t.model, config.prompt_format, load.seed,
                                                      config.workload.shared_prefix_len)
                                         for t in targets]
        results: dict[str, list[RequestResult]] = {t.label: [] for t in targets}
        walls = {t.label: 0.0 for t in targets}
        done = 0
        for r in range(num_rounds):
            count = (load.num_requests - done) // (num_rounds - r)
            round_load = replace(load, num_requests=count, first_index=load.first_index + done, duration_s=None)
            for target, prompts in zip(targets, builders):
                res, wall = await run_load(session, target, config.workload, prompts, round_load, config.options)
                results[target.label] += res
                walls[target.label] += wall
            done += count
    summaries = {t.label: await _finish(summarize(results[t.label], walls[t.label], config.slo), t, config)
                 for t in targets}
    report = {"config": _config_json(config), "targets": [asdict(t) for t in targets],
              "prompt_formats": [b.format.value for b in builders], "num_rounds": num_rounds,
              "summaries": summaries, "ratios_b_over_a": ratios(summaries["A"], summaries["B"]),
              "finished_at": time.time()}
    return report, {f"{t.label}: {t.url}": results[t.label] for t in targets}
