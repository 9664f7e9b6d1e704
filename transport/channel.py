"""One UCX endpoint carrying kvmesh messages, both directions: the part client and server share.

A message is an active message holding the msgpack header, followed by one tagged message per
frame. Tags are worker-wide in UCX, so each side picks the 20-bit prefix of the tags it receives
on (exchanged in the handshake): tag = prefix << 44 | (request_id mod 2**32) << 12 | frame_index.
A frame is received only once it has arrived (tag probe), straight into the caller's buffer, after
its length has been checked against the header.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import structlog
from transport import buffers
from transport._ucx import Array, Tag
from transport.errors import PeerUnreachable, TransferTimeout, WireDecodeError
from transport.progress import Progress
from transport.wire import Envelope, decode, encode

log = structlog.get_logger("transport")

Into = Sequence[Any] | Callable[[Any, tuple[int, ...]], Sequence[Any]] | None


def frame_tag(prefix: int, request_id: int, index: int) -> Tag:
    return Tag((prefix << 44) | ((request_id & 0xFFFFFFFF) << 12) | index)


class Channel:
    def __init__(self, *, worker: Any, progress: Progress, ucx_ep: Any, peer: str, config: Any,
                 recv_prefix: int, on_envelope: Callable[[Envelope], None],
                 on_decode_error: Callable[[WireDecodeError], None],
                 on_closed: Callable[[PeerUnreachable], None]) -> None:
        self.peer = peer
        self.recv_prefix = recv_prefix
        self.send_prefix = 0  # the peer's prefix, known after the handshake
        self.last_rx = time.monotonic()
        self._worker = worker
        self._progress = progress
        self._ep = ucx_ep
        self._config = config
        self._on_envelope = on_envelope
        self._on_decode_error = on_decode_error
        self._on_closed = on_closed
        self._owned: set[asyncio.Future] = set()
        self.error: PeerUnreachable | None = None
        ucx_ep.set_close_callback(self._on_ucx_error)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def closed(self) -> bool:
        return self.error is not None

    # -- sending ---------------------------------------------------------------------------

    async def send(self, env: Envelope, frames: Sequence[Any] = ()) -> None:
        """Send a header and its frames; returns once UCX has finished with the frame buffers."""
        views = [buffers.as_bytes_view(f, writable=False) for f in frames]  # refuse before sending
        if len(views) > self._config.max_frames:
            raise ValueError(f"{len(views)} frames exceed max_frames={self._config.max_frames}")
        sizes = tuple(int(v.nbytes) for v in views)
        header = encode(Envelope(env.kind, env.request_id, env.message, sizes))
        self._check_open()
        try:
            header_arr = Array(header)
            self._progress.detach(self._ep.am_send(header_arr), keep=header_arr)
            futs = []
            for i, view in enumerate(views):
                arr = Array(view)
                req = self._ep.tag_send(arr, frame_tag(self.send_prefix, env.request_id, i))
                futs.append(self._own(self._progress.wait(req, keep=(arr, view))))
        except Exception as e:
            raise self._unreachable("send failed", e) from e
        for fut in futs:
            await self._await(fut, "frame send failed")

    # -- receiving -------------------------------------------------------------------------

    async def recv_frames(self, env: Envelope, into: Into = None,
                          timeout: float | None = None) -> list[Any]:
        """Receive the frames announced by ``env``: into ``into[i]`` where given (None entries and
        a missing ``into`` allocate). Frames that do not match the header raise WireDecodeError
        after they were drained, so the connection stays usable."""
        sizes = env.frame_sizes
        targets = into(env.message, sizes) if callable(into) else into
        targets = list(targets) if targets is not None else [None] * len(sizes)
        problem = None
        if len(targets) != len(sizes):
            problem = f"{len(sizes)} frames announced, {len(targets)} buffers given"
            targets = [None] * len(sizes)
        out, caller_error = [], None
        for i, (target, size) in enumerate(zip(targets, sizes)):
            if target is not None:
                try:
                    buffers.as_bytes_view(target, writable=True)
                except (ValueError, TypeError) as e:  # still drain, then raise it
                    caller_error, target = caller_error or e, None
            if target is not None and buffers.nbytes(target) != size:
                problem = problem or f"frame {i}: {size} B announced, buffer holds {buffers.nbytes(target)} B"
                target = None
            out.append(target if target is not None else buffers.allocate(size))
        timeout = self._config.frame_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        recvs = []
        for i, (target, size) in enumerate(zip(out, sizes)):
            probe = self._own(self._progress.probe(frame_tag(self.recv_prefix, env.request_id, i)))
            try:
                result = await asyncio.wait_for(self._await(probe, "frame lost"),
                                                max(deadline - time.monotonic(), 0))
            except TimeoutError as e:
                raise TransferTimeout(f"frame {i} of request {env.request_id} from {self.peer} "
                                      f"did not arrive within {timeout} s") from e
            if result.length != size:
                problem = problem or f"frame {i}: {size} B announced, {result.length} B sent"
                target = buffers.allocate(result.length)
            view = buffers.as_bytes_view(target, writable=True)
            arr = Array(view)
            req = self._worker.tag_recv_with_handle(arr, result)
            recvs.append(self._own(self._progress.wait(req, keep=(arr, view))))
        for fut in recvs:
            await self._await(fut, "frame receive failed")
        self.last_rx = time.monotonic()
        if caller_error is not None:
            raise caller_error
        if problem:
            raise WireDecodeError(problem, request_id=env.request_id, frame_sizes=sizes)
        return out

    async def _read_loop(self) -> None:
        # ucxx routes active messages by endpoint handle and cannot withdraw a posted receive: the
        # one left posted when this endpoint dies may swallow the first message of a new endpoint
        # that reuses the handle. The handshake resends Hello for that reason (node.py).
        while not self.closed:
            try:
                req = self._ep.am_recv()
                await self._await(self._own(self._progress.wait(req)), "header receive failed")
            except PeerUnreachable:
                return
            except Exception as e:
                self.fail(self._unreachable("header receive failed", e))
                return
            self.last_rx = time.monotonic()
            try:
                env = decode(memoryview(req.recv_buffer),
                             max_header_bytes=self._config.max_header_bytes,
                             max_frames=self._config.max_frames)
            except WireDecodeError as e:
                self._on_decode_error(e)
                continue
            self._on_envelope(env)

    # -- failure and close -----------------------------------------------------------------

    def _own(self, fut: asyncio.Future) -> asyncio.Future:
        if self.error is not None:
            fut.cancel()
        else:
            self._owned.add(fut)
            fut.add_done_callback(self._owned.discard)
        return fut

    async def _await(self, fut: asyncio.Future, what: str) -> Any:
        try:
            return await fut
        except asyncio.CancelledError:
            if self.error is not None and fut.cancelled():
                raise self.error
            raise
        except PeerUnreachable:
            raise
        except Exception as e:  # a UCX status: the endpoint broke under this request
            raise self._unreachable(what, e) from e

    def _check_open(self) -> None:
        if self.error is not None:
            raise self.error

    def _unreachable(self, what: str, cause: BaseException | None = None) -> PeerUnreachable:
        if self.error is not None:
            return self.error
        err = PeerUnreachable(f"{what}: peer {self.peer}" + (f" ({cause})" if cause else ""))
        err.__cause__ = cause
        return err

    def _on_ucx_error(self) -> None:
        cause = None
        try:
            self._ep.raise_on_error()
        except Exception as e:
            cause = e
        self.fail(self._unreachable("connection lost", cause))

    def fail(self, err: PeerUnreachable) -> None:
        """Mark the channel dead: every pending operation on it raises ``err``; the UCX endpoint
        is released on the next loop turn (this may run inside worker progress)."""
        if self.error is not None:
            return
        self.error = err
        for fut in list(self._owned):
            if not fut.done():
                fut.cancel()  # _await turns a cancel after failure into self.error
        if not self._reader.done() and self._reader is not asyncio.current_task():
            self._reader.cancel()
        asyncio.get_running_loop().call_soon(self._release)
        self._on_closed(err)

    def _release(self) -> None:
        """Close the UCX endpoint."""
        if self._ep is None:
            return
        ep, self._ep = self._ep, None
        try:
            ep.remove_close_callback()
            ep.close_blocking(period=int(1e8), max_attempts=1)
        except Exception as e:
            log.warning("endpoint_close_failed", peer=self.peer, error=str(e))

    async def close(self, reason: str = "closed locally") -> None:
        self.fail(PeerUnreachable(f"{reason}: peer {self.peer}"))
        self._release()
        if not self._reader.done():
            try:
                await self._reader
            except (asyncio.CancelledError, PeerUnreachable):
                pass
