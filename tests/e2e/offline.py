"""Reference outputs straight from the engine, in this process: what the services must reproduce."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.worker.engine.api import GenerateRequest, SamplingParams


@dataclass(frozen=True)
class Reference:
    text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str


def offline_generate(requests: list[GenerateRequest], num_kv_blocks: int = 512) -> list[Reference]:
    from services.worker.engine.async_engine import AsyncEngine
    from services.worker.engine.config import EngineConfig

    async def run() -> list[Reference]:
        # Every prompt computed from scratch: the reference for servers that reuse cached prefixes.
        engine = AsyncEngine(EngineConfig(model="tiny", num_kv_blocks=num_kv_blocks, enable_prefix_caching=False))
        await engine.start()
        try:
            out = []
            for request in requests:
                deltas = [d async for d in engine.generate(request)]
                out.append(Reference("".join(d.text for d in deltas), deltas[-1].num_prompt_tokens,
                                     deltas[-1].num_generated_tokens, deltas[-1].finish_reason.value))
            return out
        finally:
            await engine.stop()

    return asyncio.run(run())


def greedy(request_id: str, max_tokens: int, **prompt) -> GenerateRequest:
    return GenerateRequest(request_id, SamplingParams(max_tokens=max_tokens, temperature=0.0), **prompt)
