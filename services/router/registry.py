"""Worker registry: who serves what, how loaded, and who is alive. Plain Python; time is injected.

A worker is live when it has heartbeated within `heartbeat_timeout_s` and, if the router saw it
fail (connection refused, stream cut), has heartbeated again since. A worker silent for longer is
presumed gone, with the KV blocks it held: memory servers free its blocks (their heartbeat answer no
longer names it), and the cluster's block count leaves out its last report until it heartbeats again.
A worker silent for `FORGET_AFTER_TIMEOUTS` timeouts is forgotten (replaced workers come back under
new ids: the list would grow for good); the model names it served stay known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from services.router.policy import Candidate
from services.runtime.wire import WorkerLoad, WorkerRegistration


@dataclass(slots=True)
class WorkerState:
    info: WorkerRegistration
    load: WorkerLoad | None
    last_seen: float
    failed_at: float | None = None
    inflight_requests: int = 0
    inflight_tokens: int = 0  # router-side view: max_tokens of each routed, unfinished sequence


# Silent this many heartbeat timeouts (5 minutes at the default 3 s), a worker is forgotten.
FORGET_AFTER_TIMEOUTS = 100


class WorkerRegistry:
    def __init__(self, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self._timeout = heartbeat_timeout_s
        self._forget_after = FORGET_AFTER_TIMEOUTS * heartbeat_timeout_s
        self._clock = clock
        self._workers: dict[str, WorkerState] = {}
        # Names served by forgotten workers: a request for one is told no worker serves it now (503),
        # not that the model does not exist (404)
        self._retired_names: set[str] = set()

    def register(self, info: WorkerRegistration) -> None:
        old = self._workers.get(info.worker_id)
        state = WorkerState(info=info, load=None, last_seen=self._clock())
        if old is not None:  # keep the router's own in-flight accounting across re-registration
            state.inflight_requests, state.inflight_tokens = old.inflight_requests, old.inflight_tokens
        self._workers[info.worker_id] = state

    def heartbeat(self, load: WorkerLoad) -> bool:
        """Record a heartbeat; False if the worker is unknown (it should register again)."""
        state = self._workers.get(load.worker_id)
        if state is None:
            return False
        state.load = load
        state.last_seen = self._clock()
        return True

    def deregister(self, worker_id: str) -> bool:
        return self._workers.pop(worker_id, None) is not None

    def forget_silent(self) -> list[str]:
        """Forget the workers silent for FORGET_AFTER_TIMEOUTS heartbeat timeouts; their ids.
        One that heartbeats later is told to register again, as after deregistering."""
        now = self._clock()
        gone = [wid for wid, s in self._workers.items() if now - s.last_seen >= self._forget_after]
        for worker_id in gone:
            self._retired_names.update(self._workers.pop(worker_id).info.served_names)
        return gone

    def excuse(self, seconds: float) -> None:
        """The router itself stalled for ``seconds`` (frozen, starved of CPU): no heartbeat could
        arrive meanwhile, so that silence is held against no worker. Times move together, so a
        worker seen to fail stays failed until it heartbeats again."""
        now = self._clock()
        for s in self._workers.values():
            s.last_seen = min(now, s.last_seen + seconds)
            if s.failed_at is not None:
                s.failed_at = min(now, s.failed_at + seconds)

    def mark_failed(self, worker_id: str) -> None:
        state = self._workers.get(worker_id)
        if state is not None:
            state.failed_at = self._clock()

    def is_live(self, state: WorkerState) -> bool:
        if state.load is not None and state.load.draining:
            return False
        if state.failed_at is not None and state.last_seen <= state.failed_at:
            return False
        return not self.is_silent(state)

    def is_silent(self, state: WorkerState) -> bool:
        """No heartbeat within the timeout: presumed gone (a draining or failed worker that still
        heartbeats is not silent)."""
        return self._clock() - state.last_seen >= self._timeout

    def present(self) -> list[WorkerState]:
        """Workers not presumed gone (live, draining, or failed but still heartbeating): the owners
        whose KV blocks exist, on themselves and on memory servers."""
        return [s for s in self._workers.values() if not self.is_silent(s)]

    def get(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerState]:
        return list(self._workers.values())

    def live(self, model: str | None = None) -> list[WorkerState]:
        return [
            s for s in self._workers.values() if self.is_live(s) and (model is None or model in s.info.served_names)
        ]

    def live_models(self) -> dict[str, int]:
        """Model name (aliases and LoRA adapters too) -> smallest max_model_len among its live workers
        (first registered first)."""
        models: dict[str, int] = {}
        for s in self.live():
            for name in s.info.served_names:
                models[name] = min(models.get(name, s.info.max_model_len), s.info.max_model_len)
        return models

    def lora_adapter(self, name: str) -> tuple[str, str] | None:
        """(adapter directory, base model name) when a live worker serves `name` as a LoRA adapter."""
        for s in self.live(name):
            if name in (s.info.lora_modules or {}):
                return s.info.lora_modules[name], s.info.model_name
        return None

    def canonical(self, name: str) -> str:
        """The name a live worker registered its model under, for one of its names (vLLM answers
        with the first of --served-model-name; a LoRA adapter's name is its own)."""
        return next((name if name in (s.info.lora_modules or {}) else s.info.model_name for s in self.live(name)),
                    name)

    def base_name(self, name: str) -> str:
        """The base model a live worker serves under one of its names (an alias's, a LoRA adapter's)."""
        return next((s.info.model_name for s in self.live(name)), name)

    def eos_token_ids(self, name: str) -> frozenset[int]:
        """What ends a sequence of the model a live worker serves under `name` (empty: not told)."""
        return next((frozenset(s.info.eos_token_ids or ()) for s in self.live(name)), frozenset())

    def knows(self, name: str) -> bool:
        """Some worker, live or not, serves (or served until it went silent) a model by that name."""
        return name in self._retired_names or any(name in s.info.served_names for s in self._workers.values())

    def candidates(self, model: str, exclude: frozenset[str] = frozenset()) -> list[Candidate]:
        out = []
        for s in self.live(model):
            if s.info.worker_id in exclude:
                continue
            free = s.load.num_free_blocks if s.load is not None else s.info.num_total_blocks
            out.append(Candidate(s.info.worker_id, s.inflight_tokens, free))
        return out

    def dispatch(self, worker_id: str, num_tokens: int) -> None:
        state = self._workers.get(worker_id)
        if state is not None:
            state.inflight_requests += 1
            state.inflight_tokens += num_tokens

    def release(self, worker_id: str, num_tokens: int) -> None:
        state = self._workers.get(worker_id)
        if state is not None:
            state.inflight_requests = max(0, state.inflight_requests - 1)
            state.inflight_tokens = max(0, state.inflight_tokens - num_tokens)
