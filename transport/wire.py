"""Every message type on the kvmesh transport, and the one encode/decode pair.

A message is a msgpack header (this module) plus zero or more raw frames (tensors) sent beside it;
the header carries the frame sizes. Header layout (a msgpack map with short keys):

    {"t": type name, "v": type version, "k": 0 request / 1 reply, "id": request id,
     "f": [frame nbytes, ...], "b": {field: value}, "d": [bytes | nil, ...] (optional)}

Small CPU frames travel inside the header ("d", one entry per frame: the bytes, or nil for a frame
sent as its own tagged message); that saves the tagged message and the probe for it. Larger frames
(and CUDA ones) are always tagged messages, received zero-copy into the caller's buffer.

Adding a type takes a few lines; fields must be msgpack-native (int, float, str, bytes, bool,
None, lists/tuples, dicts). Sequences decode as tuples, so frozen messages stay hashable:

    @message
    @dataclass(frozen=True, slots=True)
    class Free:
        TYPE: ClassVar[str] = "free"
        VERSION: ClassVar[int] = 1
        block_ids: tuple[int, ...]

Bumping VERSION makes peers with the old version answer "unsupported_version".
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import msgpack

from transport.errors import WireDecodeError

_REGISTRY: dict[str, type] = {}
_FIELDS: dict[type, tuple[str, ...]] = {}  # registered class -> its field names
# One packer, reused: msgpack.packb builds a new one per call. Packing holds the GIL throughout
# (no Python callbacks for the types a header holds) and resets the buffer after each message.
_PACKER = msgpack.Packer(use_bin_type=True)


def message(cls: type) -> type:
    """Class decorator: register a frozen dataclass as a wire message type."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    type_name = cls.__dict__.get("TYPE")
    if not isinstance(type_name, str) or not isinstance(cls.__dict__.get("VERSION"), int):
        raise TypeError(f"{cls.__name__} needs TYPE: ClassVar[str] and VERSION: ClassVar[int]")
    if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
        raise ValueError(f"wire type {type_name!r} registered twice")
    _REGISTRY[type_name] = cls
    _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return cls


class Kind(enum.IntEnum):
    REQUEST = 0
    REPLY = 1


_KINDS = (Kind.REQUEST, Kind.REPLY)


class Envelope(NamedTuple):
    """A decoded header: routing fields plus the message. A named tuple, not a dataclass: one is
    built per message received, and a frozen dataclass costs several times more to build."""

    kind: Kind
    request_id: int
    message: Any
    frame_sizes: tuple[int, ...] = ()
    inline: tuple[Any, ...] | None = None  # per frame: its bytes (sent in the header) or None


def encode(env: Envelope) -> bytes:
    return encode_header(env.kind, env.request_id, env.message, env.frame_sizes, env.inline)


def encode_header(kind: Kind, request_id: int, message: Any, frame_sizes: tuple[int, ...] = (),
                  inline: tuple[Any, ...] | list[Any] | None = None) -> bytes:
    """``encode`` without building the Envelope first (the send path)."""
    cls = type(message)
    names = _FIELDS.get(cls)
    if names is None:  # registration guarantees one class per type name
        raise TypeError(f"{cls.__name__} is not a registered wire message")
    header = {"t": cls.TYPE, "v": cls.VERSION, "k": kind, "id": request_id, "f": frame_sizes,
              "b": {name: getattr(message, name) for name in names}}
    if inline is not None:
        header["d"] = inline
    return _PACKER.pack(header)


def decode(data: bytes | memoryview, *, max_header_bytes: int, max_frames: int) -> Envelope:
    """Bytes to an Envelope; every failure raises WireDecodeError (routing fields attached when
    they were readable)."""
    if len(data) > max_header_bytes:
        raise WireDecodeError(f"header of {len(data)} B exceeds {max_header_bytes} B")
    try:
        header = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireDecodeError(f"undecodable header: {e}") from e
    if not isinstance(header, dict):
        raise WireDecodeError("header is not a map")
    request_id, kind, sizes = header.get("id"), header.get("k"), header.get("f")
    if not isinstance(request_id, int) or kind not in (0, 1) or not isinstance(sizes, tuple):
        raise WireDecodeError("header lacks id/k/f")
    inline = None
    if sizes:
        if len(sizes) > max_frames or not _sizes_valid(sizes):
            raise WireDecodeError(f"bad frame list of length {len(sizes)}", request_id=request_id)
        inline = header.get("d")
        if inline is not None:
            num_inline = _num_inline(inline, sizes)
            if num_inline is None:
                raise WireDecodeError("inline frames do not match the frame list")
            if not num_inline:
                inline = None
    type_name, version, body = header.get("t"), header.get("v"), header.get("b")
    cls = _REGISTRY.get(type_name)
    problem = None
    if cls is None:
        problem = f"unknown message type {type_name!r}"
    elif version != cls.VERSION:
        problem = f"unsupported version {version!r} of {type_name!r}"
    elif not isinstance(body, dict):
        problem = f"body of {type_name!r} is not a map"
    else:
        try:
            return Envelope(_KINDS[kind], request_id, cls(**body), sizes, inline)
        except TypeError as e:
            problem = f"bad fields for {type_name!r}: {e}"
    raise WireDecodeError(problem, request_id=request_id, is_request=kind == Kind.REQUEST,
                          frame_sizes=sizes, inline=inline)


def _sizes_valid(sizes: tuple) -> bool:
    for n in sizes:
        if not isinstance(n, int) or n < 0:
            return False
    return True


def _num_inline(inline: Any, sizes: tuple) -> int | None:
    """How many frames ``inline`` holds; None if it does not match ``sizes``."""
    if not isinstance(inline, tuple) or len(inline) != len(sizes):
        return None
    num_inline = 0
    for data, n in zip(inline, sizes):
        if data is not None:
            if not isinstance(data, bytes) or len(data) != n:
                return None
            num_inline += 1
    return num_inline


# Generic messages of the RPC layer. ---------------------------------------------------------


@message
@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server, first message: a fresh nonce and the tag prefix for frames sent to it."""

    TYPE: ClassVar[str] = "hello"
    VERSION: ClassVar[int] = 1
    nonce: bytes
    tag_prefix: int


@message
@dataclass(frozen=True, slots=True)
class Challenge:
    """Server -> client: its nonce, its tag prefix, and proof it holds the token."""

    TYPE: ClassVar[str] = "challenge"
    VERSION: ClassVar[int] = 1
    nonce: bytes
    tag_prefix: int
    proof: bytes


@message
@dataclass(frozen=True, slots=True)
class Auth:
    """Client -> server: proof the client holds the token."""

    TYPE: ClassVar[str] = "auth"
    VERSION: ClassVar[int] = 1
    proof: bytes


@message
@dataclass(frozen=True, slots=True)
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    VERSION: ClassVar[int] = 1


@message
@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Reply to a request that failed: its handler raised, or it was refused."""

    TYPE: ClassVar[str] = "error"
    VERSION: ClassVar[int] = 1
    code: str
    message: str


@message
@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    VERSION: ClassVar[int] = 1


@message
@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    VERSION: ClassVar[int] = 1


@message
@dataclass(frozen=True, slots=True)
class Echo:
    """Test and benchmark message: the server sends the frames back (only the header when
    ``send_back`` is false; frames of ``reply_sizes`` bytes instead when given) after ``delay_s``,
    or fails with ``fail`` as the message when set."""

    TYPE: ClassVar[str] = "echo"
    VERSION: ClassVar[int] = 1
    note: str = ""
    delay_s: float = 0.0
    fail: str | None = None
    send_back: bool = True
    reply_sizes: tuple[int, ...] | None = None
