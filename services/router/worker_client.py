"""Router -> worker generate calls: pick a worker, open its stream, read DeltaFrames.

Connection failures before the worker has answered mark it failed and retry on the next candidate,
and so does a 503 (the worker cannot take the sequence now: its engine died, it drains, or it is
overloaded; nothing was generated yet, so another worker may serve it); failures after that raise
WorkerLost (the caller turns it into an error for the client).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
from array import array
from dataclasses import dataclass, replace

import aiohttp
import structlog

from services.router.policy import RoutingPolicy
from services.router.registry import WorkerRegistry
from services.runtime.auth import cluster_headers
from services.runtime.errors import ApiError, api_error_from_payload
from services.runtime.wire import CONTENT_TYPE, DeltaFrame, FrameDecoder, GenerateCall, WireDecodeError, encode

log = structlog.get_logger()

# 503s of a worker that will serve nothing more for now (engine died, draining): route around it
# until it heartbeats again. Any 503 sends the sequence to the next candidate.
_WORKER_GONE_CODES = frozenset({"engine_unavailable", "draining"})
PREFIX_KEY_CHARS = 1024
PREFIX_KEY_TOKENS = 256


def prefix_key(call: GenerateCall) -> bytes | None:
    """What a prompt starts with, for prefix-affinity routing (policy.PrefixAffinity), as a 16-byte
    digest (the router remembers many): a chat's messages up to its first user turn (its later
    turns start with the same ones), or the first characters or token ids of a completion's prompt."""
    if call.messages is not None:
        head = []
        for message in call.messages:
            head.append(f"{message.get('role')}\0{message.get('content')}")
            if message.get("role") == "user":
                break
        data = "\0".join(head)[:PREFIX_KEY_CHARS].encode("utf-8", "surrogatepass")
    elif call.prompt_token_ids is not None:
        data = array("q", call.prompt_token_ids[:PREFIX_KEY_TOKENS]).tobytes()
    elif call.prompt is not None:
        data = call.prompt[:PREFIX_KEY_CHARS].encode("utf-8", "surrogatepass")
    else:
        return None
    return hashlib.blake2b(data, digest_size=16).digest()


class WorkerLost(Exception):
    """The worker's stream broke before the sequence finished."""

    def __init__(self, worker_id: str, reason: str):
        super().__init__(f"worker {worker_id} failed mid-stream: {reason}")
        self.worker_id = worker_id


class UpstreamFailed(Exception):
    """The worker ended the sequence with an error or an abort (check_failed): `err` is the client's."""

    def __init__(self, err: ApiError):
        super().__init__(err.message)
        self.err = err


def check_failed(frame: DeltaFrame) -> None:
    if frame.finish_reason == "error":
        raise UpstreamFailed(ApiError(f"generation failed: {frame.error}", status=500, code="engine_error"))
    if frame.finish_reason == "abort":
        raise UpstreamFailed(ApiError("the worker aborted the request (shutting down?)", status=503, code="aborted"))


@dataclass(frozen=True, slots=True)
class WorkerPool:
    """What opening a stream needs; one per router app."""

    registry: WorkerRegistry
    session: aiohttp.ClientSession
    policy: RoutingPolicy
    cluster_token: str


class WorkerStream:
    """Async iterator of one sequence's DeltaFrames; ends after the frame with a finish_reason."""

    def __init__(self, pool: WorkerPool, worker_id: str, response: aiohttp.ClientResponse, num_tokens: int):
        self.worker_id = worker_id
        self._pool = pool
        self._response = response
        self._num_tokens = num_tokens
        self._decoder = FrameDecoder()
        self._pending: collections.deque[DeltaFrame] = collections.deque()
        self._finished = False
        self._closed = False

    def __aiter__(self) -> WorkerStream:
        return self

    async def __anext__(self) -> DeltaFrame:
        while not self._pending:
            if self._finished:
                raise StopAsyncIteration
            try:
                chunk = await self._response.content.readany()
                if not chunk:
                    raise WorkerLost(self.worker_id, "stream ended before the sequence finished")
                self._pending.extend(self._decoder.feed(chunk))
            except (aiohttp.ClientError, WireDecodeError, TimeoutError) as e:
                self._fail()
                raise WorkerLost(self.worker_id, repr(e)) from e
            except WorkerLost:
                self._fail()
                raise
        frame = self._pending.popleft()
        if frame.finish_reason is not None:
            self._finished = True
        return frame

    def _fail(self) -> None:
        self._pool.registry.mark_failed(self.worker_id)
        log.warning("worker_marked_failed", worker_id=self.worker_id)

    def close(self) -> None:
        """Release the connection; if unfinished, closing it makes the worker abort the sequence."""
        if self._closed:
            return
        self._closed = True
        self._pool.registry.release(self.worker_id, self._num_tokens)
        if self._finished:
            self._response.release()
        else:
            self._response.close()


async def open_stream(pool: WorkerPool, model: str, call: GenerateCall, num_tokens: int) -> WorkerStream:
    """Route `call` to a live worker serving `model` and return its stream once the worker accepted it
    (after its first delta). Engine errors come back as ApiError with the worker's status."""
    tried: set[str] = set()
    refused: ApiError | None = None  # the last worker's 503, if every candidate refused
    key = prefix_key(call)
    while True:
        candidate = pool.policy(pool.registry.candidates(model, frozenset(tried)), key)
        if candidate is None:
            if refused is not None:  # every worker is busy, leaving or gone: worth a retry soon
                refused.headers.setdefault("Retry-After", "1")
                raise refused
            raise ApiError(
                f"no live worker is serving model '{model}'; retry when a worker has registered",
                status=503, code="no_worker_available", headers={"Retry-After": "1"},
            )
        state = pool.registry.get(candidate.worker_id)
        pool.registry.dispatch(candidate.worker_id, num_tokens)
        # A LoRA adapter's name runs the adapter on this worker (its base model's names, none).
        lora_name = model if model in (state.info.lora_modules or {}) else None
        try:
            response = await pool.session.post(
                state.info.url + "/internal/generate", data=encode(replace(call, lora_name=lora_name)),
                headers={**cluster_headers(pool.cluster_token), "Content-Type": CONTENT_TYPE},
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            pool.registry.release(candidate.worker_id, num_tokens)
            pool.registry.mark_failed(candidate.worker_id)
            log.warning("worker_unreachable", worker_id=candidate.worker_id, error=repr(e))
            tried.add(candidate.worker_id)
            continue
        except BaseException:
            pool.registry.release(candidate.worker_id, num_tokens)
            raise
        if response.status != 200:
            try:
                body = await response.read()
            finally:
                response.release()
                pool.registry.release(candidate.worker_id, num_tokens)
            error = api_error_from_payload(response.status, body)
            if response.status != 503:
                raise error
            if error.code in _WORKER_GONE_CODES:
                pool.registry.mark_failed(candidate.worker_id)
            log.warning("worker_refused", worker_id=candidate.worker_id, code=error.code)
            tried.add(candidate.worker_id)
            refused = error
            continue
        return WorkerStream(pool, candidate.worker_id, response, num_tokens)


async def call_worker_json(pool: WorkerPool, model: str, path: str, body: dict) -> dict:
    """POST body to `path` on a live worker serving `model` (the next one if it cannot be reached);
    its JSON answer, or its error as ApiError."""
    tried: set[str] = set()
    while True:
        candidates = pool.registry.candidates(model, frozenset(tried))
        if not candidates:
            raise ApiError(f"no live worker is serving model '{model}'; retry when a worker has registered",
                           status=503, code="no_worker_available", headers={"Retry-After": "1"})
        worker_id = min(candidates, key=lambda c: c.outstanding_tokens).worker_id
        try:
            return await _post_json(pool, worker_id, path, body)
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            log.warning("worker_unreachable", worker_id=worker_id, error=repr(e))
            tried.add(worker_id)


async def post_worker_json(pool: WorkerPool, worker_id: str, path: str, body: dict) -> dict:
    """POST body to `path` on one worker; its JSON answer, or its error as ApiError (502 when it
    cannot be reached)."""
    if pool.registry.get(worker_id) is None:
        raise ApiError(f"worker {worker_id} is gone", status=502, code="worker_unreachable")
    try:
        return await _post_json(pool, worker_id, path, body)
    except (aiohttp.ClientConnectionError, TimeoutError) as e:
        raise ApiError(f"worker {worker_id} is unreachable: {e!r}", status=502, code="worker_unreachable") from e


async def post_each_worker_json(pool: WorkerPool, worker_ids: list[str], path: str, body: dict) -> list:
    """post_worker_json to each worker at once; per worker, in order, its answer or its ApiError."""
    return await asyncio.gather(*(post_worker_json(pool, w, path, body) for w in worker_ids), return_exceptions=True)


async def _post_json(pool: WorkerPool, worker_id: str, path: str, body: dict) -> dict:
    """The worker's JSON answer, or its error as ApiError; a worker that cannot be reached is
    marked failed (the connection error propagates)."""
    url = pool.registry.get(worker_id).info.url + path
    try:
        async with pool.session.post(url, json=body, headers=cluster_headers(pool.cluster_token)) as response:
            payload = await response.read()
            if response.status != 200:
                raise api_error_from_payload(response.status, payload)
            return json.loads(payload)
    except (aiohttp.ClientConnectionError, TimeoutError):
        pool.registry.mark_failed(worker_id)
        raise
