"""Routing policy: a pure function from candidate workers to the chosen one. Swap it by passing a
different `RoutingPolicy` to the router app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True, slots=True)
class Candidate:
    worker_id: str
    outstanding_tokens: int  # generation tokens owed by requests already routed there
    num_free_blocks: int


RoutingPolicy = Callable[[Sequence[Candidate]], "Candidate | None"]


def least_outstanding_tokens(candidates: Sequence[Candidate]) -> Candidate | None:
    """Fewest outstanding tokens; ties go to the most free KV blocks, then the lowest id (stable)."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.outstanding_tokens, -c.num_free_blocks, c.worker_id))
