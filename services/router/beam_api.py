"""use_beam_search on the workers (the answers come once the search ends): each step of
services.router.beam_search is one-token requests (top 2 x beam_width logprobs) for the live beams,
routed like any request (the prompt's prefix keeps them on one worker, whose prefix cache holds
the beams' shared KV); the answers' texts come from that worker's tokenizer."""

from __future__ import annotations

import itertools

from aiohttp import web

from services.router.beam_search import Beam, BeamParams, beam_search
from services.router.keys import POOL, REGISTRY
from services.router.openai_format import ChoiceState, Formatter
from services.router.protocol import ParsedRequest
from services.router.worker_client import WorkerPool, call_worker_json, check_failed, open_stream
from services.runtime.errors import ApiError
from services.runtime.wire import DeltaFrame, GenerateCall

# the first request of a search: sampling fields that shape the prompt (later ones send its ids)
_PROMPT_FIELDS = ("truncate_prompt_tokens", "cache_salt", "priority")


async def beam_answers(request: web.Request, parsed: ParsedRequest, route: str, max_tokens: int,
                       max_model_len: int, formatter: Formatter) -> list[tuple[ChoiceState, DeltaFrame]]:
    """The n best beams of each prompt: a fresh choice (index prompt * n + rank) and the one frame
    that says its whole answer, as a worker's frames would (the Formatter's paths serve it as is)."""
    pool, registry = request.app[POOL], request.app[REGISTRY]
    assert parsed.length_penalty is not None
    params = BeamParams(parsed.n, max_tokens, parsed.length_penalty, bool(parsed.sampling.get("ignore_eos")))
    eos = registry.eos_token_ids(route)
    answers: list[tuple[ChoiceState, DeltaFrame]] = []
    for p, prompt in enumerate(parsed.prompts):
        search = _Search(pool, route, prompt, parsed.sampling, params, f"{formatter.id}-{p}")
        first = await search.next_tokens(())  # also tells the prompt's ids, as the worker tokenized it
        prompt_ids = search.prompt_ids or []
        if len(prompt_ids) + max_tokens > max_model_len:  # no beam may outgrow the context
            raise ApiError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens={max_tokens} exceeds the "
                           f"model's context length of {max_model_len} tokens", code="context_length_exceeded",
                           param="max_tokens")

        async def next_tokens(generated: tuple[int, ...], first=first, search=search):
            return await search.next_tokens(generated) if generated else first

        beams = await beam_search(next_tokens, params, len(prompt_ids), eos)
        for rank, beam in enumerate(beams):
            choice = ChoiceState(index=p * parsed.n + rank, prompt_index=p)
            answers.append((choice, await _answer(pool, route, beam, prompt_ids)))
    return answers


class _Search:
    def __init__(self, pool: WorkerPool, route: str, prompt: dict, sampling: dict, params: BeamParams, rid: str):
        self.pool, self.route, self.prompt, self.rid = pool, route, prompt, rid
        self.first = {k: sampling[k] for k in _PROMPT_FIELDS if k in sampling}
        self.k = 2 * params.beam_width
        self.prompt_ids: list[int] | None = None  # as the worker tokenized it (the first step tells)
        self._ids = itertools.count()

    async def next_tokens(self, generated: tuple[int, ...]) -> list[tuple[int, float]]:
        sampling = {"max_tokens": 1, "temperature": 0.0, "logprobs": self.k, "ignore_eos": True}
        if self.prompt_ids is None:  # the first step: one beam, the prompt as the client sent it
            prompt, sampling = self.prompt, {**sampling, **self.first, "return_token_ids": True}
        else:
            prompt = {k: v for k, v in self.prompt.items() if k not in ("prompt", "messages", "tools",
                                                                         "chat_template_kwargs", "prompt_token_ids")}
            prompt["prompt_token_ids"] = self.prompt_ids + list(generated)
        call = GenerateCall(request_id=f"{self.rid}-{next(self._ids)}", sampling=sampling, **prompt)
        stream = await open_stream(self.pool, self.route, call, 1)
        try:
            frames: list[DeltaFrame] = [frame async for frame in stream]
        finally:
            stream.close()  # the worker's routing load; and an abort on the worker if cut short
        check_failed(frames[-1])  # an error or an abort (a worker shutting down) ends the search
        entries = [entry for frame in frames for entry in (frame.logprobs or ())]
        if self.prompt_ids is None:
            self.prompt_ids = list(frames[0].prompt_token_ids or [])
        return [(token_id, logprob) for token_id, _, logprob in entries[0][3]]


async def _answer(pool: WorkerPool, route: str, beam: Beam, prompt_ids: list[int]) -> DeltaFrame:
    ids = list(beam.token_ids[:-1] if beam.finished else beam.token_ids)  # EOS is not text
    text = (await call_worker_json(pool, route, "/internal/tokenize", {"tokens": ids}))["prompt"] if ids else ""
    return DeltaFrame(list(beam.token_ids), text, len(prompt_ids), len(beam.token_ids),
                      "stop" if beam.finished else "length", prompt_token_ids=prompt_ids)
