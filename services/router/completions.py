"""Serve one parsed OpenAI request: fan its sequences out to workers, then stream SSE or collect.

Every sequence is opened before the response starts, so engine errors (bad input, context too long)
still get their HTTP status. After the first byte, failures become one SSE error event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog
from aiohttp import web

from services.router.beam_api import beam_answers
from services.router.keys import ADMISSION, CONFIG, METRICS, POOL, REGISTRY
from services.router.openai_format import ChoiceState, Formatter, apply_delta, usage
from services.router.protocol import ParsedRequest
from services.router.registry import WorkerRegistry
from services.router.worker_client import UpstreamFailed, WorkerLost, WorkerStream, check_failed, open_stream
from services.runtime.bodies import json_response
from services.runtime.errors import ApiError
from services.runtime.wire import DeltaFrame, GenerateCall

log = structlog.get_logger()
RoutedSequence = tuple[ChoiceState, WorkerStream]
FormatterFactory = Callable[[ParsedRequest, str], Formatter]


@dataclass(slots=True)
class RequestClock:
    arrival: float
    first_token: float | None = None


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str  # what responses say: for an alias, its worker's model name (vLLM answers with the first)
    route: str  # what picks the workers: the name asked for (a worker without that alias never gets it)
    max_model_len: int
    base: str  # the served base model (also for a LoRA adapter): the model_name of vLLM's metrics


def resolve_model(registry: WorkerRegistry, requested: str | None) -> ResolvedModel:
    """The model asked for (default: the first served), or 503 / 404."""
    models = registry.live_models()
    if not models:
        raise ApiError("no worker available: no live worker is registered with the router",
                       status=503, code="no_worker_available", headers={"Retry-After": "1"})
    name = requested if requested is not None else next(iter(models))
    if name in models:
        return ResolvedModel(registry.canonical(name), name, models[name], registry.base_name(name))
    if registry.knows(name):
        raise ApiError(f"no live worker is serving model '{name}'", status=503, code="no_worker_available",
                       headers={"Retry-After": "1"})
    raise ApiError(f"the model '{name}' does not exist; available: {sorted(models)}",
                   status=404, code="model_not_found", param="model")


async def drive(sequences: list[RoutedSequence], on_frame: Callable[[ChoiceState, DeltaFrame], Awaitable[None]]) -> None:
    """Feed every frame of every sequence to on_frame, one at a time, in arrival order."""
    if len(sequences) == 1:
        choice, stream = sequences[0]
        async for frame in stream:
            await on_frame(choice, frame)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: ChoiceState, stream: WorkerStream) -> None:
        try:
            async for frame in stream:
                queue.put_nowait((choice, frame, None))
            queue.put_nowait((choice, None, None))
        except Exception as e:
            queue.put_nowait((choice, None, e))

    tasks = [asyncio.create_task(pump(c, s)) for c, s in sequences]
    try:
        remaining = len(tasks)
        while remaining:
            choice, frame, err = await queue.get()
            if err is not None:
                raise err
            if frame is None:
                remaining -= 1
                continue
            await on_frame(choice, frame)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _open_all(request: web.Request, parsed: ParsedRequest, model: str, max_tokens: int,
                    formatter: Formatter, opened: list[RoutedSequence]) -> None:
    pool = request.app[POOL]

    async def open_one(choice: ChoiceState, prompt: dict, seed: int | None) -> None:
        call = GenerateCall(request_id=f"{formatter.id}-{choice.index}",
                            sampling={**parsed.sampling, "max_tokens": max_tokens, "seed": seed}, **prompt)
        stream = await open_stream(pool, model, call, max_tokens)
        opened.append((choice, stream))

    jobs = []
    for p, prompt in enumerate(parsed.prompts):
        for j, seed in enumerate(parsed.choice_seeds()):
            jobs.append(open_one(ChoiceState(index=p * parsed.n + j, prompt_index=p), prompt, seed))
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, UpstreamFailed):
        return e.err
    if isinstance(e, WorkerLost):
        return ApiError(str(e), status=502, code="worker_lost")
    return e


async def serve(request: web.Request, parsed: ParsedRequest, make_formatter: FormatterFactory = Formatter,
                endpoint: str | None = None) -> web.StreamResponse:
    """make_formatter(parsed, model): what builds the response's objects (chat and completions:
    Formatter; /v1/responses: ResponsesFormatter). endpoint: the metrics label (default: parsed's)."""
    app = request.app
    metrics = app[METRICS]
    clock = RequestClock(arrival=time.monotonic())
    outcome = "error"
    formatter: Formatter | None = None
    opened: list[RoutedSequence] = []
    beamed: list[ChoiceState] = []  # use_beam_search: its answers (no sequence streams them)
    resolved: ResolvedModel | None = None
    try:
        resolved = resolve_model(app[REGISTRY], parsed.model)
        model, max_model_len = resolved.name, resolved.max_model_len
        if parsed.max_tokens is not None and parsed.max_tokens > max_model_len:
            raise ApiError(
                f"max_tokens={parsed.max_tokens} exceeds the model's context length of {max_model_len} tokens",
                code="context_length_exceeded", param="max_tokens")
        max_tokens = (parsed.max_tokens if parsed.max_tokens is not None
                      else min(app[CONFIG].default_max_tokens, max_model_len))
        with app[ADMISSION].admit():
            metrics.inflight.inc()
            try:
                formatter = make_formatter(parsed, model)
                if parsed.length_penalty is not None:  # use_beam_search
                    response = await _beam(request, parsed, resolved, max_tokens, formatter, clock, beamed)
                    outcome = "200"
                    return response
                await _open_all(request, parsed, resolved.route, max_tokens, formatter, opened)
                opened.sort(key=lambda seq: seq[0].index)
                if parsed.stream:
                    response, outcome = await _stream(request, formatter, opened, clock, resolved.base)
                else:
                    response = await _collect(formatter, opened, clock, app, resolved.base)
                    outcome = "200"
                return response
            finally:
                metrics.inflight.dec()
                for _, stream in opened:
                    stream.close()
    except ApiError as e:
        outcome = str(e.status)
        raise
    except asyncio.CancelledError:
        outcome = "client_disconnected"
        raise
    finally:
        label = endpoint or parsed.endpoint.value
        metrics.requests.labels(label, outcome).inc()
        _log_finished(request, label, parsed, formatter, opened, clock, outcome, resolved, beamed)


async def _beam(request: web.Request, parsed: ParsedRequest, resolved: ResolvedModel, max_tokens: int,
                formatter: Formatter, clock: RequestClock, beamed: list[ChoiceState]) -> web.StreamResponse:
    """use_beam_search: the answers once the search ends; streamed, as vLLM, one chunk each. The
    answers' choices are added to `beamed` (the request's log line and served metrics)."""
    try:
        answers = await beam_answers(request, parsed, resolved.route, max_tokens, resolved.max_model_len, formatter)
    except (UpstreamFailed, WorkerLost) as e:
        raise _as_api_error(e) from e
    clock.first_token = time.monotonic()
    for choice, frame in answers:
        apply_delta(choice, frame)
    choices = [choice for choice, _ in answers]
    beamed.extend(choices)
    metrics = request.app[METRICS]
    metrics.count_prompt(resolved.base, usage(choices))
    metrics.generated(resolved.base, sum(c.num_generated_tokens for c in choices))
    if not parsed.stream:
        return _whole(formatter, choices)
    response = await _open_sse(request, formatter)
    formatter.track(choices)
    for choice, frame in answers:
        await response.write(formatter.stream_chunks(choice, frame))
    await response.write(formatter.stream_tail(choices))
    await response.write_eof()
    return response


def _log_finished(request: web.Request, endpoint: str, parsed: ParsedRequest, formatter: Formatter | None,
                  opened: list[RoutedSequence], clock: RequestClock, outcome: str,
                  resolved: ResolvedModel | None, beamed: list[ChoiceState]) -> None:
    """One line per request (vLLM logs requests too), and its end-to-end latency and finish reasons
    as metrics."""
    now = time.monotonic()
    choices = [c for c, _ in opened] or beamed
    fields = {}
    if choices:
        u = usage(choices)
        fields = {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                  "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                  "finish_reasons": [c.finish_reason for c in choices],
                  "workers": sorted({s.worker_id for _, s in opened})}
    if outcome == "200" and resolved is not None:
        request.app[METRICS].served(resolved.base, now - clock.arrival, [c.finish_reason for c in choices])
    log.info("request_finished", request_id=formatter.id if formatter is not None else None,
             client_request_id=request.headers.get("X-Request-Id"), endpoint=endpoint, model=parsed.model,
             status=outcome, stream=parsed.stream, num_choices=len(choices),
             ttft_s=round(clock.first_token - clock.arrival, 4) if clock.first_token is not None else None,
             e2e_s=round(now - clock.arrival, 4), **fields)


def _observer(app: web.Application, clock: RequestClock, model: str):
    metrics = app[METRICS]
    last_seen: dict[int, float] = {}

    def observe(choice: ChoiceState, frame: DeltaFrame) -> None:
        now = time.monotonic()
        if clock.first_token is None and frame.token_ids:
            clock.first_token = now
            metrics.first_token(model, now - clock.arrival)
        if choice.index in last_seen and frame.token_ids:
            metrics.inter_token(model, now - last_seen[choice.index])
        if frame.token_ids:
            last_seen[choice.index] = now
        if frame.finish_reason is not None:
            metrics.generated(model, frame.num_generated_tokens)

    return observe


async def _collect(formatter: Formatter, sequences: list[RoutedSequence], clock: RequestClock,
                   app: web.Application, model: str) -> web.Response:
    observe = _observer(app, clock, model)

    async def on_frame(choice: ChoiceState, frame: DeltaFrame) -> None:
        observe(choice, frame)
        check_failed(frame)
        apply_delta(choice, frame)

    try:
        await drive(sequences, on_frame)
    except (UpstreamFailed, WorkerLost) as e:
        raise _as_api_error(e) from e
    choices = [c for c, _ in sequences]
    app[METRICS].count_prompt(model, usage(choices))
    return _whole(formatter, choices)


def _whole(formatter: Formatter, choices: list[ChoiceState]) -> web.Response:
    """The whole answer as one JSON response."""
    response = json_response(formatter.full_response(choices))
    response.headers["X-Request-Id"] = formatter.id
    return response


async def _open_sse(request: web.Request, formatter: Formatter) -> web.StreamResponse:
    """The SSE response, sent with its head chunk (if the formatter has one)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": formatter.id})
    await response.prepare(request)
    head = formatter.stream_head()
    if head:
        await response.write(head)
    return response


async def _stream(request: web.Request, formatter: Formatter, sequences: list[RoutedSequence],
                  clock: RequestClock, model: str) -> tuple[web.StreamResponse, str]:
    response = await _open_sse(request, formatter)
    observe = _observer(request.app, clock, model)

    async def on_frame(choice: ChoiceState, frame: DeltaFrame) -> None:
        observe(choice, frame)
        check_failed(frame)
        apply_delta(choice, frame)
        data = formatter.stream_chunks(choice, frame)
        if data:
            await response.write(data)

    choices = [c for c, _ in sequences]
    formatter.track(choices)
    try:
        try:
            await drive(sequences, on_frame)
        except (UpstreamFailed, WorkerLost, ApiError) as e:
            err = _as_api_error(e)
            log.warning("stream_failed", request_id=formatter.id, error=err.message)
            await response.write(formatter.stream_error(err))
            return response, "stream_error"
        request.app[METRICS].count_prompt(model, usage(choices))
        await response.write(formatter.stream_tail(choices))
        await response.write_eof()
    except ConnectionResetError:
        # The client left while a chunk was being written (aiohttp raises then; a client that
        # leaves while we wait for the worker cancels the handler instead): not a server error.
        # The caller closes the worker streams, which aborts the generation.
        return response, "client_disconnected"
    return response, "200"
