"""The worker's table of in-flight sequences: outstanding tokens for heartbeats, counts for drain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(slots=True)
class _Entry:
    max_tokens: int
    num_generated: int = 0


class InflightTable:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False
        self.num_completed = 0
        self.num_aborted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, request_id: str, max_tokens: int) -> None:
        self._entries[request_id] = _Entry(max_tokens)
        self._empty.clear()

    def update(self, request_id: str, num_generated: int) -> None:
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.num_generated = num_generated

    def remove(self, request_id: str, completed: bool) -> None:
        if self._entries.pop(request_id, None) is None:
            return
        if completed:
            self.num_completed += 1
        else:
            self.num_aborted += 1
        if not self._entries:
            self._empty.set()

    def request_ids(self) -> list[str]:
        return list(self._entries)

    def outstanding_tokens(self) -> int:
        return sum(max(0, e.max_tokens - e.num_generated) for e in self._entries.values())

    async def wait_empty(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except TimeoutError:
            return False
