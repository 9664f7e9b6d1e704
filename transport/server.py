"""Server side: accept connections, authenticate them, dispatch requests by message type to
async handlers, reply (or answer with an error), and keep serving other peers whatever one does."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import structlog

from transport import auth
from transport.channel import Channel, Into
from transport.client import Reply
from transport.eager import run_eagerly
from transport.errors import PeerUnreachable, TransferTimeout, WireDecodeError
from transport.wire import (Auth, Challenge, Envelope, ErrorReply, Hello, Kind, Ping, Pong,
                            Welcome)

log = structlog.get_logger("transport")

_REJECT_GRACE_S = 1.0  # let a refused client read the error and close first (NOTES-ucx.md)


@dataclass(slots=True)
class Request:
    """What a handler receives. Call ``recv_frames`` to take the frames, optionally straight into
    your own buffers; frames a handler leaves are drained after it returns."""

    message: Any
    request_id: int
    peer: str
    frame_sizes: tuple[int, ...]
    _channel: Channel
    _env: Envelope
    _taken: bool = False

    async def recv_frames(self, into: Into = None) -> list[Any]:
        if self._taken:
            raise RuntimeError("frames already received")
        self._taken = True
        if self._channel.all_inline(self._env):  # small frames came in the header: no await
            return self._channel.recv_inline(self._env, into)
        return await self._channel.recv_frames(self._env, into)

    def linger(self, seconds: float) -> None:
        """The peer will send again within about ``seconds``: poll for it rather than sleep in
        epoll once the reply is out (0 ends an earlier linger). See ``Progress.linger``."""
        self._channel.progress.linger(seconds)


Handler = Callable[[Request], Awaitable[Any]]  # returns a message or a Reply(message, frames)


class _State(enum.Enum):
    AWAIT_HELLO = 1
    AWAIT_AUTH = 2
    READY = 3
    CLOSED = 4


class Session:
    """One accepted connection."""

    def __init__(self, server: "Server", peer: str) -> None:
        self._server = server
        self.peer = peer
        self.state = _State.AWAIT_HELLO
        self._nonces = (b"", auth.new_nonce())  # (client, server)
        self._tasks: set[asyncio.Task] = set()
        self.channel: Channel | None = None

    def attach(self, channel: Channel) -> None:
        self.channel = channel
        loop = asyncio.get_running_loop()
        loop.call_later(self._server.config.connect_timeout_s, self._handshake_deadline)

    def _spawn(self, coro: Any) -> None:
        self._track(asyncio.get_running_loop().create_task(coro))

    def _track(self, task: asyncio.Task | None) -> None:
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _send(self, request_id: int, message: Any) -> None:
        """Send a reply without frames right away (nothing to wait for)."""
        try:
            self.channel.send_nowait(Kind.REPLY, request_id, message)
        except PeerUnreachable as e:
            log.info("reply_dropped", peer=self.peer, request_id=request_id, error=str(e))

    def _reject(self, reason: str, request_id: int | None = None) -> None:
        log.warning("peer_rejected", peer=self.peer, reason=reason, request_id=request_id)
        if request_id is not None:
            self._send(request_id, ErrorReply("unauthenticated", reason))
        self.state = _State.CLOSED
        asyncio.get_running_loop().call_later(_REJECT_GRACE_S, self._close_soon, reason)

    def _close_soon(self, reason: str) -> None:
        self._spawn(self.channel.close(reason))

    def _handshake_deadline(self) -> None:
        if self.state in (_State.AWAIT_HELLO, _State.AWAIT_AUTH) and not self.channel.closed:
            self._reject("no authentication within connect timeout")

    def on_envelope(self, env: Envelope) -> None:
        msg = env.message
        if self.state is _State.READY and env.kind is Kind.REQUEST:
            if isinstance(msg, Ping):
                self._send(env.request_id, Pong())
            else:  # a handler that does not wait replies from here: no task, no loop turn
                self._track(run_eagerly(self._serve(env)))
        elif self.state is _State.AWAIT_HELLO and isinstance(msg, Hello) and not env.frame_sizes:
            client_nonce = msg.nonce if isinstance(msg.nonce, bytes) else b""
            self._nonces = (client_nonce, self._nonces[1])
            self.channel.send_prefix = int(msg.tag_prefix) & 0xFFFFF
            mine = auth.proof(self._server.config.token, b"server", *self._nonces)
            self.state = _State.AWAIT_AUTH
            self._send(env.request_id, Challenge(self._nonces[1], self.channel.recv_prefix, mine))
        elif self.state is _State.AWAIT_AUTH and isinstance(msg, Hello) and msg.nonce == self._nonces[0]:
            mine = auth.proof(self._server.config.token, b"server", *self._nonces)  # resent Hello
            self._send(env.request_id, Challenge(self._nonces[1], self.channel.recv_prefix, mine))
        elif self.state is _State.AWAIT_AUTH and isinstance(msg, Auth) and not env.frame_sizes:
            expected = auth.proof(self._server.config.token, b"client", *self._nonces)
            if auth.verify(expected, msg.proof):
                self.state = _State.READY
                log.info("peer_authenticated", peer=self.peer)
                self._send(env.request_id, Welcome())
            else:
                self._reject("wrong token", env.request_id)
        elif self.state is not _State.CLOSED:
            self._reject(f"{type(msg).__name__} before authentication")

    def on_decode_error(self, e: WireDecodeError) -> None:
        if self.state is not _State.READY:
            self._reject(f"undecodable message before authentication: {e}")
            return
        log.warning("request_undecodable", peer=self.peer, request_id=e.request_id, error=str(e))
        if e.request_id is None or not e.is_request:
            self.state = _State.CLOSED
            self._spawn(self.channel.close(f"undecodable header: {e}"))
            return
        env = Envelope(Kind.REQUEST, e.request_id, None, e.frame_sizes, e.inline)
        if self.channel.all_inline(env):
            self._send(e.request_id, ErrorReply("bad_request", str(e)))
        else:
            self._spawn(self._refuse(env, "bad_request", str(e)))

    async def _refuse(self, env: Envelope, code: str, reason: str) -> None:
        if not self.channel.all_inline(env):
            await self._drain(env)
        self._send(env.request_id, ErrorReply(code, reason))

    async def _drain(self, env: Envelope) -> bool:
        try:
            await self.channel.recv_frames(env)
            return True
        except WireDecodeError:
            return True
        except (PeerUnreachable, TransferTimeout) as e:
            log.warning("frames_drain_failed", peer=self.peer, request_id=env.request_id,
                        error=str(e))
            return False

    async def _serve(self, env: Envelope) -> None:
        handler = self._server.handlers.get(type(env.message))
        if handler is None:
            await self._refuse(env, "unknown_type", f"no handler for {type(env.message).__name__}")
            return
        request = Request(env.message, env.request_id, self.peer, env.frame_sizes, self.channel, env)
        try:
            result = await handler(request)
        except PeerUnreachable as e:
            log.info("request_abandoned", peer=self.peer, request_id=env.request_id, error=str(e))
            return
        except WireDecodeError as e:
            await self._refuse(env if not request._taken else _no_frames(env), "bad_request", str(e))
            return
        except Exception as e:
            log.warning("handler_failed", peer=self.peer, request_id=env.request_id,
                        message_type=type(env.message).__name__, error=repr(e))
            code = getattr(e, "code", None) or type(e).__name__
            await self._refuse(env if not request._taken else _no_frames(env), str(code), str(e))
            return
        if not request._taken and not self.channel.all_inline(env) and not await self._drain(env):
            return
        reply = result if isinstance(result, Reply) else Reply(result)
        try:
            sends = self.channel.send_nowait(Kind.REPLY, env.request_id, reply.message,
                                             reply.frames)
            for fut in sends:  # hold the reply's buffers until UCX is done with them
                await self.channel.await_op(fut, "frame send failed")
        except PeerUnreachable as e:
            log.info("reply_dropped", peer=self.peer, request_id=env.request_id, error=str(e))
        except (ValueError, TypeError) as e:  # the handler's reply is unsendable (non-contiguous...)
            log.warning("reply_refused", peer=self.peer, request_id=env.request_id, error=str(e))
            self._send(env.request_id, ErrorReply("bad_reply", str(e)))

    def on_closed(self, err: PeerUnreachable) -> None:
        self.state = _State.CLOSED
        self._server.sessions.discard(self)
        log.info("peer_disconnected", peer=self.peer, reason=str(err))
        if self._server.on_session_closed is not None:
            self._server.on_session_closed(self.peer)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.channel is not None:
            await self.channel.close("server closing")


def _no_frames(env: Envelope) -> Envelope:
    return Envelope(env.kind, env.request_id, env.message, ())


class Server:
    """Listens for peers; ``handlers`` maps a message type to ``async fn(Request) -> reply``."""

    def __init__(self, *, config: Any, handlers: dict[type, Handler], host: str,
                 on_session_closed: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.handlers = dict(handlers)
        self.host = host
        self.on_session_closed = on_session_closed  # called with the peer name when a session ends
        self.port = 0
        self.sessions: set[Session] = set()
        self.listener: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        self.listener = None
        for session in list(self.sessions):
            await session.close()
        self.sessions.clear()
