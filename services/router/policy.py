"""Routing policy: a callable from candidate workers (and the request's prefix key) to the chosen
one. Swap it by passing a different `RoutingPolicy` factory's product to the router app.

The default, `PrefixAffinity`, sends a request whose prompt starts like a recent one (a chat's next
turn, another question on the same system prompt or document) to the worker that served that one,
where its prefix cache holds their KV, unless that worker is clearly busier than the least loaded:
then load wins. A prefix not seen recently goes to the least loaded worker.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

# The remembered worker is taken while its outstanding tokens are at most twice the least loaded
# candidate's plus this: a few requests' worth of imbalance buys the reuse of a prompt's KV.
AFFINITY_SLACK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class Candidate:
    worker_id: str
    outstanding_tokens: int  # generation tokens owed by requests already routed there
    num_free_blocks: int


RoutingPolicy = Callable[[Sequence[Candidate], "bytes | None"], "Candidate | None"]


def least_outstanding_tokens(candidates: Sequence[Candidate], prefix_key: bytes | None = None) -> Candidate | None:
    """Fewest outstanding tokens; ties go to the most free KV blocks, then the lowest id (stable)."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.outstanding_tokens, -c.num_free_blocks, c.worker_id))


class PrefixAffinity:
    """Least outstanding tokens, except that a prefix key routed recently goes back to its worker
    within the load bound (AFFINITY_SLACK_TOKENS). Remembers the last `max_keys` keys."""

    def __init__(self, max_keys: int = 65536):
        self._max_keys = max_keys
        self._worker_of: OrderedDict[bytes, str] = OrderedDict()

    def __call__(self, candidates: Sequence[Candidate], prefix_key: bytes | None = None) -> Candidate | None:
        least = least_outstanding_tokens(candidates)
        if least is None or prefix_key is None:
            return least
        chosen = least
        remembered = self._worker_of.get(prefix_key)
        for c in candidates:
            if c.worker_id == remembered:
                if c.outstanding_tokens <= 2 * least.outstanding_tokens + AFFINITY_SLACK_TOKENS:
                    chosen = c
                break
        self._worker_of[prefix_key] = chosen.worker_id
        self._worker_of.move_to_end(prefix_key)
        if len(self._worker_of) > self._max_keys:
            self._worker_of.popitem(last=False)
        return chosen
