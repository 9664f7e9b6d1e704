"""Client side: a connection with many requests in flight, matched by request id; a pool."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import structlog

from transport import buffers
from transport.channel import Channel, Into
from transport.errors import PeerUnreachable, RemoteError, TransferTimeout, WireDecodeError
from transport.wire import Envelope, ErrorReply, Kind, Ping

log = structlog.get_logger("transport")


@dataclass(frozen=True, slots=True)
class Reply:
    """A message with its frames: what ``request`` returns and what a handler may return."""

    message: Any
    frames: Sequence[Any] = ()


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future
    into: Into
    views: list | None = None  # as_bytes_view of each ``into`` entry (a list ``into`` only)
    receiving: bool = False  # frames are being received into caller buffers
    deadline: float | None = None  # loop time: sending and the reply (see _expire)
    what: tuple = ()  # (message type name, request id, timeout): for the TransferTimeout


@dataclass(slots=True)
class _Liveness:
    interval_s: float
    timeout_s: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Connection:
    """An authenticated connection to one server. Use ``request``; ``close`` when done (or let the
    pool own it)."""

    def __init__(self, *, address: str, config: Any) -> None:
        self.address = address
        self._config = config
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._live = _Liveness(config.heartbeat_interval_s, config.peer_timeout_s)
        self._silence_since = time.monotonic()
        self.channel: Channel | None = None  # set by Node.connect right after construction
        self.ready = False  # handshake done; liveness pings only after it (handshake has its own)
        self._monitor: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None  # deadline of the earliest request
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, channel: Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()  # asyncio.get_running_loop() costs a getpid()
        self._monitor = self._loop.create_task(self._watch_liveness())

    @property
    def closed(self) -> bool:
        return self.channel is None or self.channel.closed

    async def request(self, message: Any, frames: Sequence[Any] = (), *, into: Into = None,
                      timeout: float | None = None) -> Reply:
        """Send ``message`` with ``frames``; return the reply. ``into``: buffers for the reply's
        frames (list, None entries allocate) or ``fn(reply_message, frame_sizes) -> list``.
        Raises RemoteError, PeerUnreachable, TransferTimeout (WireDecodeError if the reply's frames
        do not match ``into``). A timeout while reply frames stream into caller buffers closes the
        connection, since those buffers could still be written."""
        return await self.start_request(message, frames, into=into, timeout=timeout)

    def start_request(self, message: Any, frames: Sequence[Any] = (), *, into: Into = None,
                      timeout: float | None = None, sent: list | None = None) -> asyncio.Future:
        """``request`` without a coroutine, for callers that chain callbacks or run the loop
        themselves: posts the request now (in the loop's thread) and returns the future of its
        Reply, failed with the errors ``request`` raises. The frames must stay unchanged until
        that future is done; cancelling it withdraws the request. ``sent``: a list that receives
        the futures of the frames sent as tagged messages (done once UCX has read them)."""
        timeout = self._config.request_timeout_s if timeout is None else timeout
        views = None
        if into is not None and not callable(into):  # refuse unusable buffers before sending
            views = [None if target is None else buffers.as_bytes_view(target, writable=True)
                     for target in into]
        channel, loop = self.channel, self._loop
        request_id = next(self._ids)
        deadline = loop.time() + timeout
        future = loop.create_future()
        pending = _Pending(future, into, views, deadline=deadline,
                           what=(type(message).__name__, request_id, timeout))
        if not self._pending:
            self._silence_since = time.monotonic()
            self._live.wake.set()
        self._pending[request_id] = pending
        future.add_done_callback(lambda _: self._pending.pop(request_id, None))
        try:
            sends = channel.send_nowait(Kind.REQUEST, request_id, message, frames)
        except BaseException:
            future.cancel()
            raise
        for send in sends:  # tagged frames: a failed send fails the request
            send.add_done_callback(lambda op: self._frame_sent(op, future))
        if sent is not None:
            sent.extend(sends)
        # The deadline covers sending and the reply: one timer per connection (_expire).
        if self._timer is None or deadline < self._timer_at:
            self._arm_timer(loop, deadline)
        return future

    def _frame_sent(self, op: asyncio.Future, future: asyncio.Future) -> None:
        error = self.channel.op_error(op, "frame send failed")
        if error is not None and not future.done():
            future.set_exception(error)

    def _timed_out(self, type_name: str, request_id: int, timeout: float) -> TransferTimeout:
        return TransferTimeout(f"{type_name} request {request_id} to {self.address} timed out "
                               f"after {timeout} s")

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        """Fail the requests whose deadline passed; re-arm for the earliest remaining one."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now, earliest = loop.time(), None
        for pending in list(self._pending.values()):
            if pending.deadline is None or pending.future.done():
                continue
            if pending.deadline <= now:
                pending.future.set_exception(self._timed_out(*pending.what))
                if pending.receiving:
                    loop.create_task(self.close("reply frames timed out"))
            elif earliest is None or pending.deadline < earliest:
                earliest = pending.deadline
        if earliest is not None:
            self._arm_timer(loop, earliest)

    def on_envelope(self, env: Envelope) -> None:
        if env.kind != Kind.REPLY:
            log.warning("message_dropped", peer=self.address, request_id=env.request_id,
                        reason="request sent to a client")
            return
        pending = self._pending.get(env.request_id)
        inline_only = self.channel.all_inline(env)
        if pending is None or pending.future.done():  # timed out meanwhile: drain its frames
            if not inline_only:
                asyncio.get_running_loop().create_task(self._drain(env))
            return
        if isinstance(env.message, ErrorReply):
            if not inline_only:
                asyncio.get_running_loop().create_task(self._drain(env))
            pending.future.set_exception(RemoteError(env.message.message, env.message.code))
        elif not env.frame_sizes:
            pending.future.set_result(Reply(env.message))
        elif inline_only:  # fast path: frames came in the header, copy them right here
            try:
                frames = self.channel.recv_inline(env, pending.into, pending.views)
            except Exception as e:
                pending.future.set_exception(e)
            else:
                pending.future.set_result(Reply(env.message, frames))
        else:
            pending.receiving = True
            asyncio.get_running_loop().create_task(self._receive(pending, env))

    async def _receive(self, pending: _Pending, env: Envelope) -> None:
        try:
            frames = await self.channel.recv_frames(env, pending.into, views=pending.views)
        except (PeerUnreachable, TransferTimeout, WireDecodeError, ValueError, TypeError) as e:
            if not pending.future.done():
                pending.future.set_exception(e)
            return
        finally:
            pending.receiving = False
        if not pending.future.done():
            pending.future.set_result(Reply(env.message, frames))

    async def _drain(self, env: Envelope) -> None:
        try:
            await self.channel.recv_frames(env)
        except (PeerUnreachable, TransferTimeout, WireDecodeError) as e:
            log.warning("frames_drain_failed", peer=self.address, request_id=env.request_id,
                        error=str(e))

    def on_decode_error(self, e: WireDecodeError) -> None:
        pending = self._pending.get(e.request_id) if e.request_id is not None else None
        if pending is not None and not pending.future.done():
            pending.future.set_exception(e)
        log.warning("reply_undecodable", peer=self.address, request_id=e.request_id, error=str(e))
        if e.frame_sizes:
            env = Envelope(Kind.REPLY, e.request_id, None, e.frame_sizes, e.inline)
            if not self.channel.all_inline(env):
                asyncio.get_running_loop().create_task(self._drain(env))

    def on_closed(self, err: PeerUnreachable) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(err)
        self._live.wake.set()
        log.info("connection_closed", peer=self.address, num_failed=len(self._pending),
                 reason=str(err))

    async def _watch_liveness(self) -> None:
        """While requests wait, ping a silent peer; declare it unreachable after peer_timeout_s."""
        live = self._live
        while not self.closed:
            if not self._pending:
                live.wake.clear()
                await live.wake.wait()
                # Woken by a request: if the loop did not run between that request and now (its
                # owner posts, computes, and runs the loop only to wait), that time is no silence.
                self._silence_since = max(self._silence_since, time.monotonic() - live.interval_s)
                continue
            slept_at = time.monotonic()
            await asyncio.sleep(live.interval_s)
            if not self._pending or self.closed or not self.ready:
                continue
            now = time.monotonic()
            if now - slept_at > 2 * live.interval_s:
                # The loop did not run meanwhile (its owner runs it only while it waits for a
                # reply, or a long callback held it): nothing could be heard and no ping went
                # out, so that time is no silence. The peer gets a fresh window from now.
                self._silence_since = max(self._silence_since, now - live.interval_s)
            silent_s = now - max(self.channel.last_rx, self._silence_since)
            if silent_s > live.timeout_s:
                log.warning("peer_silent", peer=self.address, silent_s=round(silent_s, 3),
                            num_pending=len(self._pending))
                self.channel.fail(PeerUnreachable(
                    f"peer {self.address} silent for {silent_s:.2f} s"))
                return
            if silent_s >= live.interval_s:
                self._ping()

    def _ping(self) -> None:
        request_id = next(self._ids)
        try:
            self.channel.send_nowait(Kind.REQUEST, request_id, Ping())
        except PeerUnreachable:
            pass  # the failure already reached every pending request through on_closed

    async def close(self, reason: str = "closed locally") -> None:
        if self._monitor is not None and not self._monitor.done():
            self._monitor.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.channel is not None and not self.channel.closed:
            await self.channel.close(reason)
        elif self.channel is not None:
            await self.channel.close(reason)


class ConnectionPool:
    """Connections keyed by address, reused while alive, re-dialled when dead."""

    def __init__(self, dial: Callable[[str], Awaitable[Connection]]) -> None:
        self._dial = dial
        self._conns: dict[str, Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def peek(self, address: str) -> Connection | None:
        """The live connection to ``address``, if there is one (``get`` dials otherwise)."""
        conn = self._conns.get(address)
        return conn if conn is not None and not conn.closed else None

    async def get(self, address: str) -> Connection:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            conn = self._conns.get(address)
            if conn is None or conn.closed:
                conn = await self._dial(address)
                self._conns[address] = conn
            return conn

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.close()
