"""Conformance of the UCX transport against real echo-server processes on loopback."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import torch

from tests.transport.conftest import TOKEN, start_server
from transport.client import _Pending
from transport._ucx import Array
from transport.channel import frame_tag
from transport.config import TransportConfig
from transport.errors import PeerUnreachable, RemoteError, TransferTimeout
from transport.node import Node
from transport.wire import Echo

GENEROUS_S = 5.0  # failure-detection bound asserted by tests (target is < 1 s)
SIZES = [0, 1, 4096, 4 << 20, 64 << 20]
DTYPES = [torch.float32, torch.bfloat16, torch.int8]


def make_frame(nbytes: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    numel = nbytes // torch.empty(0, dtype=dtype).element_size()
    return raw[: numel * torch.empty(0, dtype=dtype).element_size()].view(dtype) if numel else raw[:nbytes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nbytes", SIZES)
async def test_round_trip_sizes_and_dtypes(node, echo_server, nbytes, dtype):
    conn = await node.pool.get(echo_server.address)
    frame = make_frame(nbytes, dtype, seed=nbytes)
    out = torch.empty_like(frame)
    reply = await conn.request(Echo(note=f"{nbytes}"), [frame], into=[out])
    assert reply.message == Echo(note=f"{nbytes}")
    assert reply.frames[0] is out
    assert torch.equal(out.view(torch.uint8), frame.view(torch.uint8))


async def test_multiple_frames_allocated_on_receive(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    frames = [torch.arange(10, dtype=torch.float32), b"", bytearray(b"abc"), torch.ones(3, 4)]
    reply = await conn.request(Echo(note="ünïcode ✓"), frames)
    assert reply.message.note == "ünïcode ✓"
    assert torch.equal(reply.frames[0].view(torch.float32), frames[0])
    assert reply.frames[1].numel() == 0
    assert bytes(reply.frames[2].numpy()) == b"abc"
    assert torch.equal(reply.frames[3].view(torch.float32).view(3, 4), frames[3])


async def test_200_concurrent_requests_on_one_connection(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    frames = [torch.full((1000 + i,), i, dtype=torch.int32) for i in range(200)]
    replies = await asyncio.gather(*(conn.request(Echo(note=str(i)), [f]) for i, f in enumerate(frames)))
    for i, reply in enumerate(replies):
        assert reply.message.note == str(i)
        assert torch.equal(reply.frames[0].view(torch.int32), frames[i])


async def test_32_connections_to_one_server(node, echo_server):
    conns = [await node.connect(echo_server.address) for _ in range(32)]
    replies = await asyncio.gather(*(c.request(Echo(note=str(i)), [torch.full((4096,), float(i))])
                                     for i, c in enumerate(conns)))
    assert [r.message.note for r in replies] == [str(i) for i in range(32)]
    assert all(torch.equal(r.frames[0].view(torch.float32), torch.full((4096,), float(i)))
               for i, r in enumerate(replies))
    for c in conns:
        await c.close()


async def test_receive_into_pool_slot_leaves_other_slots_untouched(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    pool = torch.full((8, 16, 64), -1.0, dtype=torch.bfloat16)  # [num_blocks, block_size, d]
    block = torch.randn(16, 64).to(torch.bfloat16)
    await conn.request(Echo(), [block], into=[pool[3]])
    assert torch.equal(pool[3], block)
    others = torch.cat([pool[:3], pool[4:]])
    assert torch.all(others == -1.0)


async def test_into_callable_sees_reply_header(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    seen = []
    dest = torch.zeros(256, dtype=torch.uint8)

    def into(message, sizes):
        seen.append((message.note, sizes))
        return [dest]

    await conn.request(Echo(note="cb"), [torch.arange(256, dtype=torch.uint8)], into=into)
    assert seen == [("cb", (256,))]
    assert torch.equal(dest, torch.arange(256, dtype=torch.uint8))


async def test_non_contiguous_tensor_refused(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    with pytest.raises(ValueError, match="non-contiguous"):
        await conn.request(Echo(), [torch.randn(8, 8).t()])
    with pytest.raises(ValueError, match="non-contiguous"):
        await conn.request(Echo(), [torch.randn(4)], into=[torch.empty(8)[::2]])
    assert (await conn.request(Echo(note="still fine"))).message.note == "still fine"


async def test_handler_error_becomes_remote_error(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    with pytest.raises(RemoteError) as info:
        await conn.request(Echo(fail="boom"), [torch.ones(10)])
    assert info.value.code == "RuntimeError" and info.value.message == "boom"
    assert (await conn.request(Echo(note="ok"))).message.note == "ok"


async def test_deadline_raises_transfer_timeout_and_connection_survives(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    with pytest.raises(TransferTimeout):
        await conn.request(Echo(delay_s=2.0), timeout=0.2)
    assert (await conn.request(Echo(note="after"))).message.note == "after"


async def test_pool_reuses_and_redials(node, echo_server):
    a = await node.pool.get(echo_server.address)
    assert await node.pool.get(echo_server.address) is a
    await a.close()
    b = await node.pool.get(echo_server.address)
    assert b is not a and (await b.request(Echo(note="b"))).message.note == "b"


# -- malformed input: refused, while other peers keep being served --------------------------


def _send_raw(conn, header: dict | bytes, frames=()) -> asyncio.Future:
    """Send a hand-made header (and frames) as request ``header['id']``; the reply's future."""
    fut = asyncio.get_running_loop().create_future()
    raw = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    if isinstance(header, dict):
        conn._pending[header["id"]] = _Pending(fut, None)
    ch = conn.channel
    arr = Array(raw)
    ch._progress.detach(ch._ep.am_send(arr), arr)
    for i, f in enumerate(frames):
        farr = Array(f.numpy())
        ch._progress.detach(ch._ep.tag_send(farr, frame_tag(ch.send_prefix, header["id"], i)), farr)
    return fut


async def _still_serves(node, address):
    other = await node.connect(address)
    assert (await other.request(Echo(note="other peer"), [torch.ones(100)])).message.note == "other peer"
    await other.close()


@pytest.mark.parametrize("case", ["unknown_type", "wrong_version", "bad_fields", "frame_too_long",
                                  "frame_too_short"])
async def test_bad_request_answered_with_error(node, echo_server, case):
    conn = await node.connect(echo_server.address)
    header = {"t": "echo", "v": 1, "k": 0, "id": 10_000, "f": [], "b": {}}
    frames = ()
    if case == "unknown_type":
        header["t"] = "no_such_type"
    elif case == "wrong_version":
        header["v"] = 99
    elif case == "bad_fields":
        header["b"] = {"unexpected": 1}
    elif case == "frame_too_long":
        header["f"], frames = [4096], [torch.ones(8192, dtype=torch.uint8)]
    elif case == "frame_too_short":
        header["f"], frames = [8192], [torch.ones(4096, dtype=torch.uint8)]
    with pytest.raises(RemoteError) as info:
        await asyncio.wait_for(_send_raw(conn, header, frames), GENEROUS_S)
    assert info.value.code in ("bad_request", "unknown_type")
    assert (await conn.request(Echo(note="same conn"))).message.note == "same conn"
    await _still_serves(node, echo_server.address)
    await conn.close()


@pytest.mark.parametrize("raw", [b"\xc1\xc1 not msgpack", b"\x00" * (2 << 20)], ids=["garbage", "oversized"])
async def test_undecodable_header_closes_only_that_connection(node, echo_server, raw):
    conn = await node.connect(echo_server.address)
    pending = asyncio.ensure_future(conn.request(Echo(delay_s=30.0)))
    await asyncio.sleep(0.05)
    _send_raw(conn, raw)
    with pytest.raises(PeerUnreachable):
        await asyncio.wait_for(pending, GENEROUS_S)
    await _still_serves(node, echo_server.address)


async def test_wrong_token_rejected_and_others_served(echo_server):
    bad = await Node.start(TransportConfig(token=b"wrong"))
    try:
        with pytest.raises(PeerUnreachable, match="token"):
            await bad.connect(echo_server.address)
    finally:
        await bad.close()
    good = await Node.start(TransportConfig(token=TOKEN.encode()))
    try:
        await _still_serves(good, echo_server.address)
    finally:
        await good.close()


async def test_bad_proof_and_unauthenticated_requests_refused(node, echo_server, monkeypatch):
    from transport import auth

    real_proof = auth.proof
    monkeypatch.setattr(auth, "proof", lambda token, role, *n: real_proof(
        token, role, *n) if role == b"server" else b"x" * 32)
    with pytest.raises(RemoteError) as info:
        await node.connect(echo_server.address)
    assert info.value.code == "unauthenticated"
    monkeypatch.undo()
    await _still_serves(node, echo_server.address)


# -- failure detection -----------------------------------------------------------------------


async def test_kill_during_pending_request_fails_it_promptly(node, fresh_server):
    conn = await node.connect(fresh_server.address)
    pending = [asyncio.ensure_future(conn.request(Echo(delay_s=60.0), [torch.ones(1000)]))
               for _ in range(5)]
    await asyncio.sleep(0.1)
    start = time.monotonic()
    fresh_server.kill()
    for fut in pending:
        with pytest.raises(PeerUnreachable):
            await asyncio.wait_for(fut, GENEROUS_S)
    assert time.monotonic() - start < GENEROUS_S
    assert conn.closed


async def test_kill_mid_transfer_fails_promptly(node, fresh_server):
    conn = await node.connect(fresh_server.address)
    big = torch.randn(16 << 20)  # 64 MiB

    async def hammer():
        while True:
            await conn.request(Echo(), [big])

    task = asyncio.ensure_future(hammer())
    await asyncio.sleep(0.3)
    start = time.monotonic()
    fresh_server.kill()
    with pytest.raises(PeerUnreachable):
        await asyncio.wait_for(task, GENEROUS_S)
    assert time.monotonic() - start < GENEROUS_S


async def test_kill_while_idle_then_request_fails_promptly(node, fresh_server):
    conn = await node.connect(fresh_server.address)
    await conn.request(Echo())
    fresh_server.kill()
    fresh_server.proc.wait(10)
    start = time.monotonic()
    with pytest.raises(PeerUnreachable):
        await asyncio.wait_for(conn.request(Echo(), [torch.ones(10)]), GENEROUS_S)
    assert time.monotonic() - start < GENEROUS_S
    with pytest.raises(PeerUnreachable):
        await node.connect(fresh_server.address)


async def test_silent_peer_fails_pending_requests(node, fresh_server):
    import signal

    conn = await node.connect(fresh_server.address)
    fresh_server.kill(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable, match="silent"):
            await asyncio.wait_for(conn.request(Echo()), GENEROUS_S)
        assert time.monotonic() - start < GENEROUS_S
    finally:
        fresh_server.kill(signal.SIGKILL)
        fresh_server.kill(signal.SIGCONT)


async def test_connect_to_nothing_is_unreachable(node):
    with pytest.raises(PeerUnreachable):
        await asyncio.wait_for(node.connect("127.0.0.1:1"), GENEROUS_S)


# -- small frames inside the header, larger ones tagged ---------------------------------------


async def test_inline_and_tagged_frames_mixed_in_one_message(node, echo_server):
    conn = await node.pool.get(echo_server.address)
    frames = [torch.arange(100, dtype=torch.uint8), torch.randn(64 << 10), b"xyz", torch.randn(3)]
    outs = [torch.empty(100, dtype=torch.uint8), torch.empty(64 << 10), None, torch.empty(3)]
    reply = await conn.request(Echo(note="mixed"), frames, into=outs)
    assert reply.frames[0] is outs[0] and reply.frames[1] is outs[1] and reply.frames[3] is outs[3]
    assert torch.equal(outs[0], frames[0]) and torch.equal(outs[1], frames[1])
    assert bytes(reply.frames[2].numpy()) == b"xyz" and torch.equal(outs[3], frames[3])


async def test_inline_reply_into_wrong_size_buffer_raises_and_connection_survives(node, echo_server):
    from transport.errors import WireDecodeError

    conn = await node.pool.get(echo_server.address)
    with pytest.raises(WireDecodeError):
        await conn.request(Echo(), [torch.ones(64, dtype=torch.uint8)],
                           into=[torch.empty(32, dtype=torch.uint8)])
    reply = await conn.request(Echo(reply_sizes=(4096, 256)), [torch.ones(4096, dtype=torch.uint8)])
    assert [f.numel() for f in reply.frames] == [4096, 256]


async def test_start_request_settles_its_future_from_callbacks(node, echo_server):
    """The callback API a worker's step thread uses through call_soon_threadsafe: replies (inline
    and tagged frames), handler errors and deadlines all settle the future, and it is cancellable."""
    conn = await node.pool.get(echo_server.address)
    assert node.pool.peek(echo_server.address) is conn and node.pool.peek("127.0.0.1:1") is None
    big, out = torch.randn(64 << 10), torch.empty(64 << 10)
    futs = [conn.start_request(Echo(note="small"), [torch.ones(4)]),
            conn.start_request(Echo(note="big"), [big], into=[out]),
            conn.start_request(Echo(fail="boom")),
            conn.start_request(Echo(delay_s=2.0), timeout=0.2)]
    done, _ = await asyncio.wait(futs, timeout=GENEROUS_S)
    assert len(done) == 4
    assert futs[0].result().message.note == "small"
    assert futs[1].result().frames[0] is out and torch.equal(out, big)
    assert isinstance(futs[2].exception(), RemoteError)
    assert isinstance(futs[3].exception(), TransferTimeout)
    cancelled = conn.start_request(Echo(delay_s=0.2))
    cancelled.cancel()
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert not conn._pending  # withdrawn: a late reply is dropped
    assert (await conn.request(Echo(note="after"))).message.note == "after"
