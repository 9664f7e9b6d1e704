"""An echo server process for the transport tests and benchmark.

    python -m transport.testing_server [--port 0] [--token-env KVMESH_CLUSTER_TOKEN]

Prints ``READY host:port`` on stdout once listening, serves ``Echo`` (frames sent back) until
SIGTERM/SIGINT or stdin closes, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import structlog
import torch
import uvloop

from transport.client import Reply
from transport.config import TransportConfig
from transport.node import Node
from transport.server import Request
from transport.wire import Echo


_REPLY_FRAMES: dict[int, torch.Tensor] = {}  # reply_sizes frames, made once per size


def _reply_frame(nbytes: int) -> torch.Tensor:
    frame = _REPLY_FRAMES.get(nbytes)
    if frame is None:
        frame = _REPLY_FRAMES[nbytes] = torch.full((nbytes,), 7, dtype=torch.uint8)
    return frame


async def handle_echo(request: Request) -> Reply:
    frames = await request.recv_frames()
    msg: Echo = request.message
    if msg.delay_s:
        await asyncio.sleep(msg.delay_s)
    if msg.fail is not None:
        raise RuntimeError(msg.fail)
    if msg.reply_sizes is not None:
        frames = [_reply_frame(n) for n in msg.reply_sizes]
    return Reply(msg, frames if msg.send_back else ())


async def serve(port: int) -> None:
    node = await Node.start(TransportConfig.from_env())
    server = await node.listen({Echo: handle_echo}, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:  # parent gone (stdin closed) -> exit; /dev/null cannot be watched, then signals only
        loop.add_reader(0, lambda: stop.set() if not os.read(0, 4096) else None)
        watching_stdin = True
    except PermissionError:
        watching_stdin = False
    print(f"READY {server.address}", flush=True)
    await stop.wait()
    if watching_stdin:
        loop.remove_reader(0)
    await node.close()


def main() -> None:
    # stdout carries only the READY line (the parent stops reading it); logs go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
