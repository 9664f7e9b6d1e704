"""What `kvmesh up` does when one of its processes dies while the cluster serves.

A worker or memory server that dies is replaced: the router already routes around a dead worker,
and workers recompute what they had on a lost memory server, so the cluster keeps serving while
the replacement starts (a memory server's capacity, or a worker's, comes back with it). A router
that dies ends the cluster: every other process depends on it. So does a crash loop: more than
``max_restarts`` replacements of one kind of process within ``window_s`` means the cause will not
go away by itself (bad model, port clash, out of memory), and the launcher stops with its log.
Plain Python; time is injected.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass(slots=True)
class RestartBudget:
    max_restarts: int = 5
    window_s: float = 120.0
    clock: Callable[[], float] = time.monotonic
    _recent: dict[str, deque] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("max_restarts must be >= 0 and window_s > 0")

    def allow(self, kind: str) -> bool:
        """May one more process of this kind be replaced now? Counts the replacement if so."""
        now = self.clock()
        recent = self._recent.setdefault(kind, deque())
        while recent and now - recent[0] >= self.window_s:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            return False
        recent.append(now)
        return True
