"""Unit tests of the pure parts: wire encoding, auth proofs, frame views, config. No sockets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import msgpack
import numpy as np
import pytest
import torch

from transport import auth, buffers
from transport.config import TransportConfig
from transport.errors import RemoteError, WireDecodeError
from transport.wire import Echo, Envelope, ErrorReply, Hello, Kind, decode, encode, message

LIMITS = {"max_header_bytes": 1 << 20, "max_frames": 4096}


def test_encode_decode_round_trip():
    env = Envelope(Kind.REQUEST, 42, Echo(note="x", delay_s=0.5), (0, 4096))
    assert decode(encode(env), **LIMITS) == env
    reply = Envelope(Kind.REPLY, 7, ErrorReply("bad_request", "nope"))
    assert decode(encode(reply), **LIMITS) == reply


def test_bytes_fields_and_sequences_decode_as_tuples():
    @message
    @dataclass(frozen=True, slots=True)
    class Blocks:
        TYPE: ClassVar[str] = "test_blocks"
        VERSION: ClassVar[int] = 3
        block_ids: tuple[int, ...]

    env = Envelope(Kind.REQUEST, 1, Blocks((1, 2, 3)))
    assert decode(encode(env), **LIMITS).message == Blocks((1, 2, 3))
    assert decode(encode(Envelope(Kind.REQUEST, 2, Hello(b"\x00\xff", 5))), **LIMITS).message.nonce == b"\x00\xff"


def _raw(**over):
    header = {"t": "echo", "v": 1, "k": 0, "id": 9, "f": [16], "b": {}}
    header.update(over)
    return msgpack.packb(header, use_bin_type=True)


@pytest.mark.parametrize("raw, routed", [
    (b"\xc1", False),
    (msgpack.packb([1, 2]), False),
    (_raw(id="x"), False),
    (_raw(f=[-1]), True),
    (_raw(t="nope"), True),
    (_raw(v=2), True),
    (_raw(b={"zzz": 1}), True),
])
def test_decode_failures_are_typed(raw, routed):
    with pytest.raises(WireDecodeError) as info:
        decode(raw, **LIMITS)
    assert (info.value.request_id == 9) == routed


def test_oversized_header_and_too_many_frames_refused():
    with pytest.raises(WireDecodeError, match="exceeds"):
        decode(b"\x00" * 100, max_header_bytes=64, max_frames=8)
    with pytest.raises(WireDecodeError, match="frame list"):
        decode(_raw(f=[1] * 9), max_header_bytes=1 << 20, max_frames=8)


def test_unregistered_or_mutable_types_rejected():
    @dataclass(frozen=True)
    class NotRegistered:
        TYPE: ClassVar[str] = "unregistered"
        VERSION: ClassVar[int] = 1

    with pytest.raises(TypeError):
        encode(Envelope(Kind.REQUEST, 1, NotRegistered()))
    with pytest.raises(TypeError):
        @message
        @dataclass
        class Mutable:
            TYPE: ClassVar[str] = "mutable"
            VERSION: ClassVar[int] = 1


def test_auth_proofs_bind_token_role_and_nonces():
    a, b = auth.new_nonce(), auth.new_nonce()
    p = auth.proof(b"t", b"client", a, b)
    assert auth.verify(p, auth.proof(b"t", b"client", a, b))
    assert not auth.verify(p, auth.proof(b"u", b"client", a, b))
    assert not auth.verify(p, auth.proof(b"t", b"server", a, b))
    assert not auth.verify(p, auth.proof(b"t", b"client", b, a))
    assert not auth.verify(p, "not bytes")


def test_frame_views_are_zero_copy_and_refuse_non_contiguous():
    t = torch.randn(4, 8).to(torch.bfloat16)
    view = buffers.as_bytes_view(t, writable=True)
    assert view.nbytes == t.numel() * 2 and view.ctypes.data == t.data_ptr()
    assert buffers.nbytes(t) == 64 and buffers.nbytes(b"abc") == 3
    with pytest.raises(ValueError, match="non-contiguous"):
        buffers.as_bytes_view(t.t(), writable=False)
    with pytest.raises(ValueError, match="non-contiguous"):
        buffers.as_bytes_view(np.zeros((4, 4))[:, 1], writable=False)
    with pytest.raises(ValueError, match="read-only"):
        buffers.as_bytes_view(b"abc", writable=True)
    assert buffers.as_bytes_view(torch.tensor(3.0), writable=False).nbytes == 4


def test_config_validation():
    with pytest.raises(ValueError):
        TransportConfig(token="str")
    with pytest.raises(ValueError):
        TransportConfig(heartbeat_interval_s=2.0, peer_timeout_s=1.0)
    assert TransportConfig().ucx_options()["NET_DEVICES"] == "lo"


def test_remote_error_carries_code_and_message():
    e = RemoteError("boom", "RuntimeError")
    assert (e.code, e.message) == ("RuntimeError", "boom")


def test_inline_frames_round_trip_and_mismatch_refused():
    env = Envelope(Kind.REPLY, 3, Echo(), (3, 5, 0), (b"abc", None, b""))
    assert decode(encode(env), **LIMITS) == env
    none_inline = Envelope(Kind.REPLY, 3, Echo(), (3,), (None,))
    assert decode(encode(none_inline), **LIMITS).inline is None
    with pytest.raises(WireDecodeError, match="inline"):
        decode(_raw(f=[4], d=[b"abc"]), **LIMITS)
    with pytest.raises(WireDecodeError, match="inline"):
        decode(_raw(f=[3, 1], d=[b"abc"]), **LIMITS)
