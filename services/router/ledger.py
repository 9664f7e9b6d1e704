"""The global KV manager's borrow ledger: which memory servers exist, how much they have free, and
which worker holds how many blocks where. Plain Python; time is injected.

A worker borrows N blocks: the ledger picks creditors (the servers already holding the sequence,
then the most free, so a sequence lands on as few servers as possible) and reserves them before
the worker transfers anything. The worker then stores the blocks on each creditor, which may still
refuse (the ledger's view can be stale), and settles each reservation with the number actually
stored; a refused worker asks again. Repaid blocks return to the creditor's free count. A
memserver's heartbeat (its own count of free blocks and of blocks per owner) is the truth the
ledger re-bases on.

A creditor a worker could not reach at all (dead, or cut off) lends nothing until its next
heartbeat shows it alive: without that, for the seconds until its heartbeats are missed, every
worker that spilled was sent to it again (its free blocks made it the first choice), failed, and
asked again, some fifty times a second each.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class InsufficientCapacity(Exception):
    def __init__(self, wanted: int, available: int):
        super().__init__(f"the cluster has {available} free KV blocks on memory servers; {wanted} wanted")
        self.wanted = wanted
        self.available = available


@dataclass(slots=True)
class MemserverState:
    memserver_id: str
    address: str  # transport address, host:port
    device: str
    num_blocks: int
    num_free: int  # as last reported, minus what was lent since
    last_seen: float
    holdings: dict[str, int] = field(default_factory=dict)  # owner (worker id) -> blocks held
    leaving: bool = False
    unreachable: bool = False  # a worker could not reach it since its last heartbeat


@dataclass(frozen=True, slots=True)
class Grant:
    reservation_id: str
    memserver_id: str
    address: str
    num_blocks: int


@dataclass(slots=True)
class _Reservation:
    worker_id: str
    memserver_id: str
    num_blocks: int
    created: float


class Ledger:
    def __init__(self, heartbeat_timeout_s: float, reservation_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self._timeout = heartbeat_timeout_s
        self._reservation_timeout = reservation_timeout_s
        self._clock = clock
        self._servers: dict[str, MemserverState] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._ids = itertools.count(1)
        self._refused: dict[str, tuple[int, float]] = {}  # worker id -> (blocks it could not borrow, when)

    # --- membership ---
    def register(self, memserver_id: str, address: str, device: str, num_blocks: int, num_free: int) -> None:
        self._servers[memserver_id] = MemserverState(memserver_id, address, device, num_blocks, num_free, self._clock())

    def heartbeat(self, memserver_id: str, num_free: int, holdings: dict[str, int]) -> bool:
        state = self._servers.get(memserver_id)
        if state is None:
            return False
        state.num_free = num_free
        state.holdings = {k: v for k, v in holdings.items() if v > 0}
        state.last_seen = self._clock()
        state.unreachable = False
        return True

    def leave(self, memserver_id: str) -> None:
        state = self._servers.get(memserver_id)
        if state is not None:
            state.leaving = True

    def remove(self, memserver_id: str) -> MemserverState | None:
        for rid in [r for r, res in self._reservations.items() if res.memserver_id == memserver_id]:
            del self._reservations[rid]
        return self._servers.pop(memserver_id, None)

    def excuse(self, seconds: float) -> None:
        """The router itself stalled for ``seconds``: no memory server's heartbeat, and no worker's
        settle, could arrive meanwhile. That time counts against no lease or reservation."""
        now = self._clock()
        for state in self._servers.values():
            state.last_seen = min(now, state.last_seen + seconds)
        for res in self._reservations.values():
            res.created = min(now, res.created + seconds)

    def expire(self) -> list[str]:
        """Drop memory servers that missed heartbeats, and stale reservations; returns dropped ids."""
        now = self._clock()
        dead = [m for m, s in self._servers.items() if now - s.last_seen >= self._timeout]
        for memserver_id in dead:
            self.remove(memserver_id)
        for rid in [r for r, res in self._reservations.items() if now - res.created >= self._reservation_timeout]:
            del self._reservations[rid]
        return dead

    def servers(self) -> list[MemserverState]:
        return sorted(self._servers.values(), key=lambda s: s.memserver_id)

    # --- borrowing ---
    def _reserved(self, memserver_id: str) -> int:
        return sum(r.num_blocks for r in self._reservations.values() if r.memserver_id == memserver_id)

    def available(self, memserver_id: str) -> int:
        state = self._servers[memserver_id]
        if state.leaving or state.unreachable:
            return 0
        return max(0, state.num_free - self._reserved(memserver_id))

    def free_blocks(self) -> int:
        return sum(self.available(m) for m in self._servers)

    def capacity_blocks(self) -> int:
        """Every block of the servers that lend (not leaving, not found unreachable), free or not."""
        return sum(s.num_blocks for s in self._servers.values() if not s.leaving and not s.unreachable)

    def borrow(self, worker_id: str, num_blocks: int, near: tuple[str, ...] = (), need: int = 0) -> list[Grant]:
        """Reserve num_blocks, spreading a sequence over few servers: first the ones in ``near``
        (those already holding it, in that order), then the most free. Every layer of every step
        sends one request to each server that holds part of a sequence. Refused, the worker's
        ``need`` (what its sequence needs in all, at least num_blocks) is asked of the other
        workers' cached blocks (wanted_by_others)."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        total = self.free_blocks()
        if total < num_blocks:
            self._refused[worker_id] = (max(num_blocks, need), self._clock())
            raise InsufficientCapacity(num_blocks, total)
        self._refused.pop(worker_id, None)
        grants, left = [], num_blocks
        rank: dict[str, int] = {}
        for i, memserver_id in enumerate(near):
            rank.setdefault(memserver_id, i)  # a repeated id keeps its first place
        order = sorted(self._servers.values(), key=lambda s: (
            rank.get(s.memserver_id, len(rank)), -self.available(s.memserver_id), s.memserver_id))
        for state in order:
            n = min(left, self.available(state.memserver_id))
            if n <= 0:
                continue
            rid = f"r{next(self._ids)}"
            self._reservations[rid] = _Reservation(worker_id, state.memserver_id, n, self._clock())
            grants.append(Grant(rid, state.memserver_id, state.address, n))
            left -= n
            if left == 0:
                break
        return grants

    def wanted_by_others(self, worker_id: str) -> int:
        """Blocks other workers could not borrow lately, beyond what is free now: what `worker_id`
        should give up of the blocks it only caches (its heartbeat answer says so). Zero once
        enough is free again, or once the refusal is older than the heartbeat timeout."""
        now = self._clock()
        for w in [w for w, (_, when) in self._refused.items() if now - when > self._timeout]:
            del self._refused[w]
        wanted = sum(n for w, (n, _) in self._refused.items() if w != worker_id)
        return max(0, wanted - self.free_blocks())

    def settle(self, reservation_id: str, num_stored: int, unreachable: bool = False) -> str | None:
        """The worker stored num_stored of the reserved blocks (0: the creditor refused, or with
        ``unreachable`` could not be reached). Returns the id of a creditor newly found unreachable."""
        res = self._reservations.pop(reservation_id, None)
        if res is None:
            return None
        state = self._servers.get(res.memserver_id)
        if state is None:
            return None
        if unreachable:
            newly = not state.unreachable
            state.unreachable = True
            return state.memserver_id if newly else None
        if num_stored <= 0:
            # Refused: it had fewer free than asked, whatever its last heartbeat said (frees repaid
            # twice, a router that stalled). Lend it no more than that until its next heartbeat,
            # instead of sending the next borrower to be refused too.
            state.num_free = min(state.num_free, res.num_blocks - 1)
            return None
        stored = min(num_stored, res.num_blocks)
        state.num_free = max(0, state.num_free - stored)
        state.holdings[res.worker_id] = state.holdings.get(res.worker_id, 0) + stored
        return None

    def repay(self, worker_id: str, memserver_id: str, num_blocks: int) -> None:
        state = self._servers.get(memserver_id)
        if state is None:
            return
        held = state.holdings.get(worker_id, 0)
        returned = min(held, num_blocks)
        state.num_free = min(state.num_blocks, state.num_free + returned)
        if held - returned > 0:
            state.holdings[worker_id] = held - returned
        else:
            state.holdings.pop(worker_id, None)

    def forget_worker(self, worker_id: str) -> None:
        """A dead worker: its memservers free its blocks on their own (lease); stop counting them."""
        for rid in [r for r, res in self._reservations.items() if res.worker_id == worker_id]:
            del self._reservations[rid]

    def lent(self) -> dict[tuple[str, str], int]:
        """(worker id, memserver id) -> blocks held."""
        return {(w, s.memserver_id): n for s in self._servers.values() for w, n in s.holdings.items()}
