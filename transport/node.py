"""A process's transport endpoint: one UCX context and worker, driven by the running event loop;
it listens, connects, and pools connections."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable

import structlog

from transport import auth
from transport._ucx import ucx_api
from transport.channel import Channel
from transport.client import Connection, ConnectionPool
from transport.config import TransportConfig
from transport.errors import PeerUnreachable, RemoteError, TransferTimeout
from transport.progress import Progress
from transport.server import Handler, Server, Session
from transport.wire import Auth, Challenge, Hello, Welcome

log = structlog.get_logger("transport")

_HELLO_RESEND_S = 0.25


class Node:
    """Create with ``await Node.start(config)`` inside the event loop that will use it; ``await
    node.close()`` before that loop ends. Not thread-safe: one loop owns it."""

    def __init__(self, config: TransportConfig, ucx_api: Any) -> None:
        self.config = config
        self._ucx = ucx_api
        self._context = ucx_api.UCXContext(config.ucx_options())
        self._worker = ucx_api.UCXWorker(self._context)
        self._progress = Progress(self._worker, asyncio.get_running_loop(), config.spin_us)
        self._prefixes = itertools.count(1)
        self._servers: list[Server] = []
        self._connections: set[Connection] = set()
        self.pool = ConnectionPool(self.connect)
        self._closed = False

    @classmethod
    async def start(cls, config: TransportConfig | None = None) -> "Node":
        config = config or TransportConfig.from_env()
        return cls(config, ucx_api)

    def linger(self, seconds: float, *, any_message: bool = True) -> None:
        """Poll for messages for up to ``seconds`` rather than sleep (0 ends it): see
        ``Progress.linger``."""
        self._progress.linger(seconds, any_message=any_message)

    def _new_prefix(self) -> int:
        return next(self._prefixes) % (1 << 20) or next(self._prefixes)

    def _channel(self, ucx_ep: Any, peer: str, owner: Any) -> Channel:
        return Channel(worker=self._worker, progress=self._progress, ucx_ep=ucx_ep, peer=peer,
                       config=self.config, recv_prefix=self._new_prefix(),
                       on_envelope=owner.on_envelope, on_decode_error=owner.on_decode_error,
                       on_closed=owner.on_closed)

    async def listen(self, handlers: dict[type, Handler], port: int = 0,
                     host: str = "127.0.0.1", on_session_closed: Callable[[str], None] | None = None) -> Server:
        """Serve ``handlers`` on ``port`` (0: any free port; see ``server.address``). ``host`` is
        the address peers should dial; UCX listens on all interfaces that UCX_NET_DEVICES allows.
        ``on_session_closed(peer)`` runs when an accepted connection ends (``Request.peer`` names it)."""
        server = Server(config=self.config, handlers=handlers, host=host, on_session_closed=on_session_closed)
        counter = itertools.count(1)

        def on_connect(ucx_ep: Any) -> None:  # runs inside worker.progress(), on the loop thread
            session = Session(server, peer=f"{server.address}#{next(counter)}")
            session.attach(self._channel(ucx_ep, session.peer, session))
            server.sessions.add(session)
            self._progress.kick()

        server.listener = self._ucx.UCXListener.create(self._worker, port, on_connect,
                                                       deliver_endpoint=True)
        server.port = server.listener.port
        self._servers.append(server)
        log.info("listener_started", address=server.address)
        return server

    async def connect(self, address: str) -> Connection:
        """Dial ``host:port``, authenticate both ways; PeerUnreachable if that fails."""
        host, _, port = address.rpartition(":")
        conn = Connection(address=address, config=self.config)
        try:
            ucx_ep = self._ucx.UCXEndpoint.create(self._worker, host, int(port), True)
        except Exception as e:
            raise PeerUnreachable(f"cannot reach {address}: {e}") from e
        conn.attach(self._channel(ucx_ep, address, conn))
        self._progress.kick()
        try:
            await self._handshake(conn)
        except BaseException:
            await conn.close("handshake failed")
            raise
        conn.ready = True
        self._connections = {c for c in self._connections if not c.closed} | {conn}
        log.info("connection_opened", peer=address)
        return conn

    async def _handshake(self, conn: Connection) -> None:
        token, nonce = self.config.token, auth.new_nonce()
        timeout = self.config.connect_timeout_s
        try:
            challenge = await self._hello(conn, Hello(nonce, conn.channel.recv_prefix), timeout)
            if not isinstance(challenge, Challenge):
                raise PeerUnreachable(f"{conn.address} answered hello with "
                                      f"{type(challenge).__name__}")
            if not auth.verify(auth.proof(token, b"server", nonce, challenge.nonce), challenge.proof):
                raise PeerUnreachable(f"{conn.address} failed to prove it holds the cluster token")
            conn.channel.send_prefix = challenge.tag_prefix
            mine = auth.proof(token, b"client", nonce, challenge.nonce)
            welcome = (await conn.request(Auth(mine), timeout=timeout)).message
            if not isinstance(welcome, Welcome):
                raise PeerUnreachable(f"{conn.address} answered auth with {type(welcome).__name__}")
        except TransferTimeout as e:
            raise PeerUnreachable(f"no handshake with {conn.address} within {timeout} s") from e
        except RemoteError:
            raise

    async def _hello(self, conn: Connection, hello: Hello, timeout: float) -> object:
        """Send Hello until answered: the first message on an endpoint whose handle was reused
        can be swallowed by ucxx (see Channel._post_recv); the server answers repeats."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                return (await conn.request(hello, timeout=min(_HELLO_RESEND_S, remaining))).message
            except TransferTimeout:
                if remaining <= _HELLO_RESEND_S:
                    raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.pool.close()
        for conn in list(self._connections):
            await conn.close()
        for server in self._servers:
            await server.close()
        self._progress.close()
        self._servers.clear()
        self._connections.clear()
        # Endpoints hold the worker; drop everything UCX before the loop goes away.
        self._worker = None
        self._context = None
