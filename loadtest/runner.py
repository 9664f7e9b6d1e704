"""Drive one target with a workload: fixed concurrency (N clients back to back) or an open loop
of Poisson arrivals at a request rate; bounded by a request count and/or a duration (no new
requests after it; in-flight ones finish)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm

from loadtest.client import RequestResult, Target, send
from loadtest.prompts import PromptBuilder
from loadtest.workloads import Workload


@dataclass(frozen=True, slots=True)
class Load:
    concurrency: int = 1  # closed loop; in rate mode: the cap on requests in flight (0: none)
    request_rate: float | None = None  # requests/s, Poisson arrivals; None: closed loop
    num_requests: int | None = 100
    duration_s: float | None = None
    first_index: int = 0  # workload index of the first request (compare rounds continue the sequence)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("bound the run: give a request count, a duration, or both")
        if self.request_rate is None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request rate must be > 0, got {self.request_rate}")


@dataclass(frozen=True, slots=True)
class RunOptions:
    ignore_eos: bool = True
    timeout_s: float = 600.0
    show_progress: bool = True


class _Issuer:
    """Hands out request indexes until the count or the deadline is reached."""

    def __init__(self, load: Load, start: float):
        self._next = load.first_index
        self._end = None if load.num_requests is None else load.first_index + load.num_requests
        self._deadline = None if load.duration_s is None else start + load.duration_s

    def take(self) -> int | None:
        if (self._end is not None and self._next >= self._end) or (
                self._deadline is not None and time.perf_counter() >= self._deadline):
            return None
        self._next += 1
        return self._next - 1


async def run_load(session: aiohttp.ClientSession, target: Target, workload: Workload, prompts: PromptBuilder,
                   load: Load, options: RunOptions = RunOptions()) -> tuple[list[RequestResult], float]:
    """All results (in issue order) and the wall time from first issue to last completion."""
    start = time.perf_counter()
    issuer = _Issuer(load, start)
    results: list[RequestResult] = []
    bar = tqdm(total=load.num_requests, desc=f"{target.label} {target.url}", unit="req", leave=False,
               disable=not options.show_progress, dynamic_ncols=True)

    async def one(index: int) -> None:
        spec = workload.spec(index)
        result = await send(session, target, spec, prompts.build(index, spec.num_prompt_tokens),
                            run_start=start, ignore_eos=options.ignore_eos, timeout_s=options.timeout_s)
        results.append(result)
        bar.update(1)
        if not result.ok:
            bar.set_postfix(errors=sum(not r.ok for r in results))

    try:
        if load.request_rate is None:
            await asyncio.gather(*(_closed_loop(issuer, one) for _ in range(load.concurrency)))
        else:
            await _open_loop(issuer, one, load)
    finally:
        bar.close()
    results.sort(key=lambda r: r.index)
    return results, time.perf_counter() - start


async def _closed_loop(issuer: _Issuer, one) -> None:
    while (index := issuer.take()) is not None:
        await one(index)


async def _open_loop(issuer: _Issuer, one, load: Load) -> None:
    rng = random.Random(load.seed)
    cap = asyncio.Semaphore(load.concurrency) if load.concurrency > 0 else None
    tasks: list[asyncio.Task] = []

    async def capped(index: int) -> None:
        if cap is None:
            return await one(index)
        async with cap:
            await one(index)

    while (index := issuer.take()) is not None:
        tasks.append(asyncio.create_task(capped(index)))
        await asyncio.sleep(rng.expovariate(load.request_rate))
    await asyncio.gather(*tasks)
