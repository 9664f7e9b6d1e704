"""kvmesh transport: request/response RPC and zero-copy tensor frames over UCX (ucxx).

The only package that touches ucxx; it knows nothing of models. API::

    from transport import Node, TransportConfig, Reply, Request
    from transport.wire import Echo                   # message types live in transport.wire

    node = await Node.start(TransportConfig(token=b"cluster-secret"))   # inside the event loop

    # server side: handlers by message type; take frames straight into your own buffers
    async def put(req: Request) -> Reply:
        await req.recv_frames(into=[pool[7]])        # frame 0 lands in KV pool slot 7
        return Reply(Echo(note="stored"))             # or just return a message
    server = await node.listen({Echo: put}, port=0)   # server.address == "127.0.0.1:PORT"

    # client side: pooled connection, many requests in flight, matched by request id
    conn = await node.pool.get(server.address)       # or node.connect(address)
    reply = await conn.request(Echo(), [k_block, v_block], into=[out], timeout=5.0)
    reply.message, reply.frames                       # frames: your buffers, or new uint8 tensors

    await node.close()                                # before the loop ends

Frames: contiguous torch tensors (CPU or CUDA, any dtype: bytes are sent), numpy arrays, bytes.
Non-contiguous input raises ValueError. Small CPU frames (``inline_bytes`` per message, 6 KiB by
default) travel inside the header message and are copied into your buffers on arrival; the others
are tagged UCX messages received zero-copy straight into them. ``into`` is a list (None entries allocate) or
``fn(reply_message, frame_sizes) -> list``. A handler's unread frames are drained for it.

Errors (transport.errors): PeerUnreachable (connect failed, peer died or went silent: every
pending request on the connection fails with it, within ~10-25 ms of a kill -9, within
``peer_timeout_s`` of silence), TransferTimeout (the request's deadline passed), RemoteError
(the handler raised: ``.code`` is the exception class name or its ``code`` attribute, ``.message``;
also refusals: ``bad_request``, ``unknown_type``, ``unauthenticated``), WireDecodeError (a reply's
frames do not match the header/``into``). Malformed requests are answered with an error, or the
connection is closed with a logged reason; the server keeps serving other peers.

Authentication: HMAC challenge-response over the cluster token in both directions before any
other message is served (``transport.auth``); the token never crosses the wire.

Settings (transports, devices, progress/spin, deadlines) are in ``transport.config``. One Node per
event loop; it is not thread-safe. Tests and the benchmark start ``transport.testing_server``.
"""

from transport.client import Connection, ConnectionPool, Reply
from transport.config import TransportConfig
from transport.errors import (PeerUnreachable, RemoteError, TransferTimeout, TransportError,
                              WireDecodeError)
from transport.node import Node
from transport.server import Request, Server

__all__ = ["Connection", "ConnectionPool", "Node", "PeerUnreachable", "RemoteError", "Reply",
           "Request", "Server", "TransferTimeout", "TransportConfig", "TransportError",
           "WireDecodeError"]
