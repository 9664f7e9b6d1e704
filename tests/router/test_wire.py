import msgpack
import pytest

from services.runtime.wire import DeltaFrame, FrameDecoder, GenerateCall, WireDecodeError, WorkerLoad, decode, encode


def test_roundtrip_and_stream_decoding_across_chunk_boundaries():
    call = GenerateCall("r1", {"max_tokens": 4, "stop": ["x"]}, messages=[{"role": "user", "content": "hé"}])
    assert decode(encode(call), GenerateCall) == call
    frames = [DeltaFrame([i], chr(97 + i), 3, i + 1, "length" if i == 2 else None) for i in range(3)]
    data = b"".join(encode(f) for f in frames)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(data), 5):
        got.extend(decoder.feed(data[i:i + 5]))
    assert got == frames


def test_decode_rejects_wrong_type_version_and_garbage():
    load = WorkerLoad("w", 0, 0, 1, 1, 0)
    with pytest.raises(WireDecodeError):
        decode(encode(load), GenerateCall)
    with pytest.raises(WireDecodeError):
        decode(msgpack.packb({"t": "WorkerLoad", "v": 99}))
    with pytest.raises(WireDecodeError):
        decode(b"\xc1garbage")
    with pytest.raises(WireDecodeError):
        decode(msgpack.packb({"t": "Nope", "v": 1}))
