"""One measured run of an endpoint against one server: /v1/completions through loadtest.runner,
/v1/chat/completions through the same closed loop with loadtest.peer.chat (prompts built first, so
the tokenizer never runs inside the timed window)."""

from __future__ import annotations

import asyncio
import enum
import time

import aiohttp

from loadtest.client import RequestResult, Target
from loadtest.peer.chat import ChatPrompts, send_chat
from loadtest.prompts import PromptBuilder
from loadtest.runner import Load, RunOptions, run_load
from loadtest.workloads import Workload


class Endpoint(enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


async def run_endpoint(session: aiohttp.ClientSession, endpoint: Endpoint, target: Target, workload: Workload,
                       prompts: PromptBuilder | ChatPrompts, load: Load,
                       options: RunOptions) -> tuple[list[RequestResult], float]:
    if endpoint is Endpoint.COMPLETIONS:
        return await run_load(session, target, workload, prompts, load, options)
    return await _run_chat(session, target, workload, prompts, load, options)


async def _run_chat(session: aiohttp.ClientSession, target: Target, workload: Workload, prompts: ChatPrompts,
                    load: Load, options: RunOptions) -> tuple[list[RequestResult], float]:
    specs = workload.specs(load.first_index, load.num_requests)
    messages = {s.index: prompts.build(s.index, s.num_prompt_tokens) for s in specs}
    pending = list(reversed(specs))
    results: list[RequestResult] = []
    start = time.perf_counter()

    async def client() -> None:
        while pending:
            spec = pending.pop()
            results.append(await send_chat(session, target, spec, messages[spec.index], run_start=start,
                                           ignore_eos=options.ignore_eos, timeout_s=options.timeout_s))

    await asyncio.gather(*(client() for _ in range(load.concurrency)))
    results.sort(key=lambda r: r.index)
    return results, time.perf_counter() - start
