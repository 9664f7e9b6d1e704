"""One UCX endpoint carrying kvmesh messages, both directions: the part client and server share.

A message is an active message holding the msgpack header (with the small CPU frames inside it,
see ``transport.wire``), followed by one tagged message per other frame. Tags are worker-wide in UCX, so each side picks the 20-bit prefix of the tags it receives
on (exchanged in the handshake): tag = prefix << 44 | (request_id mod 2**32) << 12 | frame_index.
A tagged frame is received only once it has arrived (tag probe), straight into the caller's buffer,
after its length has been checked against the header. Headers are received by a driver callback:
no task or future per message.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import numpy as np
import structlog

from transport import buffers
from transport._ucx import Array, Tag
from transport.errors import PeerUnreachable, TransferTimeout, WireDecodeError
from transport.progress import Progress
from transport.wire import Envelope, Kind, decode, encode_header

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
        self.progress = progress
        self._ep = ucx_ep
        self._config = config
        self._on_envelope = on_envelope
        self._on_decode_error = on_decode_error
        self._on_closed = on_closed
        self._owned: set[asyncio.Future] = set()
        self.error: PeerUnreachable | None = None
        self._recv_req: Any = None  # the posted header receive, watched by the driver
        ucx_ep.set_close_callback(self._on_ucx_error)
        asyncio.get_running_loop().call_soon(self._post_recv)  # not inside worker progress

    @property
    def closed(self) -> bool:
        return self.error is not None

    # -- sending ---------------------------------------------------------------------------

    def send_nowait(self, kind: Kind, request_id: int, message: Any,
                    frames: Sequence[Any] = ()) -> list[asyncio.Future]:
        """Post a header and its frames without waiting: CPU frames that fit ``inline_bytes`` go
        inside the header, the others as tagged messages. Returns the futures of the tagged sends
        (done once UCX has finished with those buffers); ``send`` awaits them."""
        if not frames:  # one active message, nothing to wait for
            self._post_header(encode_header(kind, request_id, message))
            return []
        views = [buffers.as_bytes_view(f, writable=False) for f in frames]  # refuse before sending
        if len(views) > self._config.max_frames:
            raise ValueError(f"{len(views)} frames exceed max_frames={self._config.max_frames}")
        sizes = tuple(int(v.nbytes) for v in views)
        budget, inline, num_inline = self._config.inline_bytes, [], 0
        for view, size in zip(views, sizes):
            if size <= budget and isinstance(view, np.ndarray):  # CPU memory
                inline.append(memoryview(view))
                budget -= size
                num_inline += 1
            else:
                inline.append(None)
        self._post_header(encode_header(kind, request_id, message, sizes,
                                        inline if num_inline else None))
        if num_inline == len(views):
            return []
        futs = []
        try:
            for i, view in enumerate(views):
                if inline[i] is not None:
                    continue
                arr = Array(view)
                req = self._ep.tag_send(arr, frame_tag(self.send_prefix, request_id, i))
                futs.append(self._own(self._progress.wait(req, keep=(arr, view), arrival=False)))
        except Exception as e:
            raise self._unreachable("send failed", e) from e
        return futs

    def _post_header(self, header: bytes) -> None:
        if self.error is not None:
            raise self.error
        try:
            header_arr = Array(header)
            self._progress.detach(self._ep.am_send(header_arr), keep=header_arr)
        except Exception as e:
            raise self._unreachable("send failed", e) from e

    async def send(self, kind: Kind, request_id: int, message: Any,
                   frames: Sequence[Any] = ()) -> None:
        """Send a header and its frames; returns once UCX has finished with the frame buffers."""
        for fut in self.send_nowait(kind, request_id, message, frames):
            await self._await(fut, "frame send failed")

    # -- receiving -------------------------------------------------------------------------

    @staticmethod
    def all_inline(env: Envelope) -> bool:
        """Every frame of ``env`` came inside its header (true when it has none)."""
        return not env.frame_sizes or (env.inline is not None and None not in env.inline)

    def recv_inline(self, env: Envelope, into: Into = None,
                    views: Sequence[Any] | None = None) -> list[Any]:
        """``recv_frames`` for an envelope whose frames all came inline (``all_inline``): copies
        them into ``into`` right away. Same errors as ``recv_frames``."""
        out, _, tagged, problem, caller_error = self._take_inline(env, into, views)
        assert not tagged, "frames to receive: use recv_frames"
        return self._finish(env, out, problem, caller_error)

    async def recv_frames(self, env: Envelope, into: Into = None, timeout: float | None = None,
                          views: Sequence[Any] | None = None) -> list[Any]:
        """Receive the frames announced by ``env``: into ``into[i]`` where given (None entries and
        a missing ``into`` allocate). Inline frames are copied from the header; tagged frames are
        received once they have arrived (probe), straight into the buffer, after their length was
        checked. Frames that do not match the header raise WireDecodeError after they were
        drained, so the connection stays usable. Does not suspend when every frame is inline.
        ``views``: ``as_bytes_view`` of each ``into`` entry, when the caller already made them."""
        out, views, tagged, problem, caller_error = self._take_inline(env, into, views)
        if tagged:
            problem = await self._recv_tagged(env, out, views, tagged, problem, timeout)
        return self._finish(env, out, problem, caller_error)

    def _take_inline(self, env: Envelope, into: Into, views: Sequence[Any] | None
                     ) -> tuple[list, list, list[int], str | None, BaseException | None]:
        """Buffers for every frame (the caller's where usable) and their byte views (None where
        allocated here), inline frames copied in; the indices of the tagged frames still to
        receive; the first mismatch; the caller's error."""
        sizes = env.frame_sizes
        num_frames = len(sizes)
        caller_error: BaseException | None = None
        if callable(into):
            views = None
            try:
                targets = into(env.message, sizes)
            except Exception as e:  # still drain, then raise it
                caller_error, targets = e, None
        else:
            targets = into
        targets = list(targets) if targets is not None else [None] * num_frames
        problem = None
        if len(targets) != num_frames:
            problem = f"{num_frames} frames announced, {len(targets)} buffers given"
            targets, views = [None] * num_frames, None
        inline = env.inline
        out, out_views, tagged = [], [], []
        for i in range(num_frames):
            target, size = targets[i], sizes[i]
            view = None
            if target is not None:
                if views is not None:
                    view = views[i]
                else:
                    try:
                        view = buffers.as_bytes_view(target, writable=True)
                    except (ValueError, TypeError) as e:  # still drain, then raise it
                        caller_error, target = caller_error or e, None
            if target is not None and view.nbytes != size:
                problem = problem or f"frame {i}: {size} B announced, buffer holds {view.nbytes} B"
                target = view = None
            data = inline[i] if inline is not None else None
            if data is None:
                tagged.append(i)
                if target is None:
                    target = buffers.allocate(size)
            elif target is None:
                target = buffers.from_bytes(data)
            elif size:
                buffers.copy_in(view, data)
            out.append(target)
            out_views.append(view)
        return out, out_views, tagged, problem, caller_error

    async def _recv_tagged(self, env: Envelope, out: list, views: list, tagged: list[int],
                           problem: str | None, timeout: float | None) -> str | None:
        sizes = env.frame_sizes
        timeout = self._config.frame_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        recvs = []
        for i in tagged:
            target, size = out[i], sizes[i]
            probe = self._own(self._progress.probe(frame_tag(self.recv_prefix, env.request_id, i)))
            try:
                result = await asyncio.wait_for(self._await(probe, "frame lost"),
                                                max(deadline - time.monotonic(), 0))
            except TimeoutError as e:
                raise TransferTimeout(f"frame {i} of request {env.request_id} from {self.peer} "
                                      f"did not arrive within {timeout} s") from e
            view = views[i]
            if result.length != size:
                problem = problem or f"frame {i}: {size} B announced, {result.length} B sent"
                target, view = buffers.allocate(result.length), None
            if view is None:
                view = buffers.as_bytes_view(target, writable=True)
            arr = Array(view)
            req = self._worker.tag_recv_with_handle(arr, result)
            recvs.append(self._own(self._progress.wait(req, keep=(arr, view))))
        for fut in recvs:
            await self._await(fut, "frame receive failed")
        self.last_rx = time.monotonic()
        return problem

    @staticmethod
    def _finish(env: Envelope, out: list, problem: str | None,
                caller_error: BaseException | None) -> list[Any]:
        if caller_error is not None:
            raise caller_error
        if problem:
            raise WireDecodeError(problem, request_id=env.request_id, frame_sizes=env.frame_sizes)
        return out

    # Headers are received by a callback from the progress driver (no task, no future): decode,
    # hand the envelope over, post the next receive. ucxx routes active messages by endpoint
    # handle and cannot withdraw a posted receive: the one left posted when this endpoint dies may
    # swallow the first message of a new endpoint that reuses the handle. The handshake resends
    # Hello for that reason (node.py).

    def _post_recv(self) -> None:
        while self.error is None:
            try:
                req = self._ep.am_recv()
            except Exception as e:
                self.fail(self._unreachable("header receive failed", e))
                return
            if not req.completed:
                self._recv_req = req
                self._progress.watch(req, self._on_header)
                return
            self._on_message(req)  # already there: no driver round trip

    def _on_header(self, req: Any) -> None:
        self._recv_req = None
        self._on_message(req)
        self._post_recv()

    def _on_message(self, req: Any) -> None:
        if self.error is not None:
            return
        try:
            req.check_error()
        except Exception as e:
            self.fail(self._unreachable("header receive failed", e))
            return
        self.last_rx = time.monotonic()
        try:
            env = decode(memoryview(req.recv_buffer), max_header_bytes=self._config.max_header_bytes,
                         max_frames=self._config.max_frames)
        except WireDecodeError as e:
            self._on_decode_error(e)
            return
        try:
            self._on_envelope(env)
        except Exception as e:  # a bug in the owner: keep the connection serving
            log.error("envelope_dispatch_failed", peer=self.peer, request_id=env.request_id,
                      error=repr(e))

    # -- failure and close -----------------------------------------------------------------

    def _own(self, fut: asyncio.Future) -> asyncio.Future:
        if self.error is not None:
            fut.cancel()
        else:
            self._owned.add(fut)
            fut.add_done_callback(self._owned.discard)
        return fut

    def op_error(self, fut: asyncio.Future, what: str) -> PeerUnreachable | None:
        """The error ``await_op`` would raise for a finished operation (None if it succeeded)."""
        if fut.cancelled():
            return self.error or self._unreachable(what)
        error = fut.exception()
        if error is None or isinstance(error, PeerUnreachable):
            return error
        return self._unreachable(what, error)

    async def await_op(self, fut: asyncio.Future, what: str) -> Any:
        """Await a UCX operation's future; UCX errors and cancellation by ``fail`` become
        PeerUnreachable."""
        return await self._await(fut, what)

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
        if self._recv_req is not None:
            self._progress.unwatch(self._recv_req)
            self._recv_req = None
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
