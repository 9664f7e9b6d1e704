"""Drive a UCX worker from the asyncio loop: blocking mode, no progress thread, no CPU when idle.

The worker's epoll fd is a loop reader. On each wake-up (or after Python submits work) the worker
is progressed and finished UCX requests are settled: an asyncio future is resolved, or a callback
runs right there (no task hop; channels receive their headers, and servers run their handlers,
that way). After any activity (a message or frame received, a send posted) progress is retried on
each loop turn for ``spin_us``, letting other tasks run in between; then the worker
is armed and the loop sleeps in epoll. Both sides of a round trip spin: a reply, or the next
request, is caught without an epoll wake-up, and neither side's core goes idle between the two
messages. That matters most on virtual machines, where waking a peer whose core went idle costs
tens of microseconds on each side (on the 2-vCPU dev VM a 64 B RPC took ~280 us p50 with only the
client spinning, ~90 us with both; ``python -m transport.bench``). Idle costs nothing: the spin
only follows activity. And it only runs while it pays: when the gaps between activities have
mostly been longer than the spin (a memory server's attention takes milliseconds, and so does the
worker's step between two layers), spinning would only take the CPU (and the GIL) from the compute
that is about to send the next message, so the driver sleeps in epoll at once until short gaps
come back. The completion of our own sends is no activity: it follows the send at once, and
counting it made every other gap look short (the decode round trip then spun half the time on
both sides, taking a 2-core host's CPU from the attention it waited for). A slow tick guards
against a missed wake-up.

Where the gaps are long but their end is known, the caller says so: ``linger`` polls, yielding
the core between polls, until the next message or a deadline (the worker's step thread while a
layer's partial attention is out; a memory server after answering a layer that is not the
model's last, until the next layer's query). A message then finds its receiver awake: on the
2-vCPU VM a remote layer of a 4K-token decode took ~500-550 us instead of ~650 us, each side's
send ~30-40 us instead of ~55 us.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

_TICK_S = 0.05  # safety net: progress at least this often while anything is pending
_SPIN_DECAY = 0.9  # weight of the past in the share of gaps a spin would have caught


class Progress:
    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, spin_us: int) -> None:
        self._worker = worker
        self._loop = loop
        self._spin_s = spin_us / 1e6
        self._spin_until = 0.0
        self._linger_until = 0.0  # poll (yielding the core) rather than sleep until then: see linger
        self._linger_any = True  # the first message to arrive ends the linger
        self._last_activity = 0.0
        self.spin_hit_rate = 1.0  # recent share of gaps between activities shorter than the spin
        # (request, future | callback | None, keep, arrival: its completion is activity)
        self._waits: list[tuple[Any, Any, Any, bool]] = []
        self._probes: list[tuple[Any, asyncio.Future]] = []  # (tag, future of TagProbeResult)
        self._scheduled = False
        self._driving = False  # inside _drive: it decides (spin or arm) once the callbacks ran
        self._closed = False
        worker.init_blocking_progress_mode()
        self._fd = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self._on_readable)
        self._tick_handle = loop.call_later(_TICK_S, self._tick)

    @property
    def num_pending(self) -> int:
        return len(self._waits) + len(self._probes)

    def wait(self, request: Any, keep: Any = None, arrival: bool = True) -> asyncio.Future:
        """A future resolved when the UCX request completes (exception = the UCX error).
        ``keep`` (e.g. the buffer) is held until then. ``arrival``: a receive (its completion is
        activity), not a send."""
        fut = self._loop.create_future()
        if request.completed:
            _settle(request, fut)
        else:
            self._waits.append((request, fut, keep, arrival))
            self.kick()
        return fut

    def watch(self, request: Any, callback: Callable[[Any], None]) -> None:
        """Call ``callback(request)`` from the driver once ``request`` (not yet completed)
        completes; the callback checks the request's error itself. Posting it is no activity:
        it does not make the driver spin. ``unwatch`` withdraws it."""
        self._waits.append((request, callback, None, True))
        self.kick(spin=False)

    def unwatch(self, request: Any) -> None:
        for i, item in enumerate(self._waits):
            if item[0] is request:
                del self._waits[i]
                return

    def detach(self, request: Any, keep: Any = None) -> None:
        """Fire and forget: hold ``keep`` until the request completes; errors surface elsewhere
        (the endpoint's error callback). A send: the driver spins (its answer may follow)."""
        if not request.completed:
            self._waits.append((request, None, keep, False))
        self.kick()

    def probe(self, tag: Any) -> asyncio.Future:
        """A future resolved with the TagProbeResult (removed from UCX's queue) once a tagged
        message with exactly ``tag`` has arrived."""
        fut = self._loop.create_future()
        self._probes.append((tag, fut))
        self.kick()
        return fut

    def kick(self, spin: bool = True) -> None:
        if spin:
            self._activity()
        if not self._scheduled and not self._driving and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def linger(self, seconds: float, *, any_message: bool = True) -> None:
        """Poll instead of sleeping in epoll for up to ``seconds`` (0 ends it): the caller expects
        a message by then (a peer's next request, the reply a thread waits for). A message to a
        process asleep in epoll costs both sides a wake-up of an idle core, tens of microseconds
        each on a VM; lingering catches it at once. Between polls the thread yields its core to any
        other runnable thread (a co-located peer computing the answer). ``any_message``: the first
        message to arrive ends it; False: only the deadline or ``linger(0)`` do (a thread waiting
        for one reply among several)."""
        self._linger_until = time.monotonic() + seconds if seconds > 0 else 0.0
        self._linger_any = any_message
        if seconds > 0:
            self.kick(spin=False)

    def _on_readable(self) -> None:
        if not self._scheduled:  # else the scheduled turn progresses anyway
            self._drive()

    def _drive(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        self._driving = True
        lingering = self._linger_until
        try:
            self._worker.progress()
            if self._poll():
                self._activity()
                # what it lingered for came (unless a callback lingered anew)
                if self._linger_any and self._linger_until == lingering:
                    self._linger_until = 0.0
        finally:
            self._driving = False
        if self._closed:
            return
        now = time.monotonic()
        if now < self._linger_until:
            os.sched_yield()
            self._scheduled = True
            self._loop.call_soon(self._drive)
            return
        # Spin after activity; else arm, unless events arrived meanwhile: then progress again.
        if now < self._spin_until or not self._worker.arm():
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _activity(self) -> None:
        now = time.monotonic()
        caught = now - self._last_activity <= self._spin_s
        self._last_activity = now
        self.spin_hit_rate = _SPIN_DECAY * self.spin_hit_rate + (1 - _SPIN_DECAY) * caught
        if self.spin_hit_rate >= 0.5:
            self._spin_until = now + self._spin_s

    def _poll(self) -> bool:
        done_any = False
        if self._waits:
            # Callbacks may add waits (a handler replying inline): swap the list first.
            waits, self._waits = self._waits, []
            for i, item in enumerate(waits):
                request, target, _, arrival = item
                if not request.completed:
                    self._waits.append(item)
                    continue
                done_any |= arrival
                if target is None:
                    continue
                if isinstance(target, asyncio.Future):
                    _settle(request, target)
                    continue
                try:
                    target(request)
                except BaseException:  # keep the rest; the loop's handler reports the error
                    self._waits.extend(waits[i + 1:])
                    raise
        if self._probes:
            probes, self._probes = self._probes, []
            for tag, fut in probes:
                if fut.done():  # cancelled by its owner
                    continue
                result = self._worker.tag_probe(tag, remove=True)
                if result.matched:
                    done_any = True
                    fut.set_result(result)
                else:
                    self._probes.append((tag, fut))
        return done_any

    def _tick(self) -> None:
        if self._closed:
            return
        if self.num_pending and not self._scheduled:
            self._drive()
        self._tick_handle = self._loop.call_later(_TICK_S if self.num_pending else 1.0, self._tick)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._tick_handle.cancel()
        self._loop.remove_reader(self._fd)
        for _, target, _, _ in self._waits:
            if isinstance(target, asyncio.Future) and not target.done():
                target.cancel()
        for _, fut in self._probes:
            if not fut.done():
                fut.cancel()
        self._waits.clear()
        self._probes.clear()


def _settle(request: Any, fut: asyncio.Future) -> None:
    if fut.done():
        return
    try:
        request.check_error()
    except Exception as e:  # the UCX status, re-raised by the awaiting coroutine
        fut.set_exception(e)
    else:
        fut.set_result(None)
