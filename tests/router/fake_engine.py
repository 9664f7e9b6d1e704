"""A model-free engine with AsyncEngine's interface, for testing the worker and router services.

Tokens are characters: the prompt's token count is its length, and sequence i emits letters
'a', 'b', ... Each sequence holds ceil((prompt + max_tokens) / block_size) blocks until it ends.
A prompt containing "FAIL" ends with FinishReason.ERROR after two tokens. With ``refuse`` set,
every request is refused with that EngineError before it starts (a dying or overloaded engine).
"""

from __future__ import annotations

import asyncio
import math

from services.worker.engine.api import (
    ContextLengthExceeded, Delta, EngineStats, FinishReason, GenerateRequest, InvalidRequest, TokenLogprob,
)


class FakeEngine:
    def __init__(self, num_blocks: int = 256, block_size: int = 4, step_s: float = 0.002, max_model_len: int = 512):
        self.model_name = "fake"
        self.num_preemptions = 0
        self.max_model_len = max_model_len
        self.sampling_defaults: dict = {}  # what the worker front fills unset sampling fields with
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step_s = step_s
        self.used = 0
        self.running: set[str] = set()
        self._aborted: set[str] = set()
        self.requests: list[GenerateRequest] = []
        self.refuse: Exception | None = None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for rid in list(self.running):
            await self.abort(rid)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, self.num_blocks - self.used, self.num_blocks, self.block_size,
                           num_preemptions=self.num_preemptions)

    async def reset_prefix_cache(self) -> dict[str, int]:
        return {"num_local_blocks": 0, "num_remote_blocks": 0}

    async def tokenize(self, request: dict) -> dict:
        """/detokenize only: a token is the character of its code."""
        return {"prompt": "".join(chr(t) for t in request["tokens"])}

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self._aborted.add(request_id)

    def _prompt(self, request: GenerateRequest) -> str:
        if request.messages is not None:
            return "".join(f"{m['role']}:{m['content']}\n" for m in request.messages)
        if request.prompt_token_ids is not None:
            return "x" * len(request.prompt_token_ids)
        return request.prompt or ""

    async def generate(self, request: GenerateRequest):
        if self.refuse is not None:
            raise self.refuse
        params = request.sampling
        params.validate()
        prompt = self._prompt(request)
        if not prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(f"needs {len(prompt) + params.max_tokens} > {self.max_model_len}", "max_tokens")
        num_blocks = math.ceil((len(prompt) + params.max_tokens) / self.block_size)
        self.requests.append(request)
        self.used += num_blocks
        self.running.add(request.request_id)
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step_s)
                n = i + 1
                if request.request_id in self._aborted:
                    yield Delta(request.request_id, (), "", len(prompt), i, FinishReason.ABORT)
                    return
                if "FAIL" in prompt and n == 3:
                    yield Delta(request.request_id, (), "", len(prompt), i, FinishReason.ERROR, error="boom")
                    return
                token = 97 + (i + (params.seed or 0)) % 26
                lp = (TokenLogprob(token, chr(token), -0.5, ((token, chr(token), -0.5),)),) if params.logprobs is not None else None
                finish = FinishReason.LENGTH if n == params.max_tokens else None
                yield Delta(request.request_id, (token,), chr(token), len(prompt), n, finish, lp)
        finally:
            self.used -= num_blocks
            self.running.discard(request.request_id)
            self._aborted.discard(request.request_id)
