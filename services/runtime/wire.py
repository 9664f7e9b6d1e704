"""Router <-> worker messages. Every message is a frozen dataclass here; `encode` / `decode` (and
`FrameDecoder` for streams of them) are the only places bytes become objects. msgpack, never pickle.

A generate response is a stream of self-delimiting msgpack maps (no length prefix needed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import msgpack

WIRE_VERSION = 1
CONTENT_TYPE = "application/x-msgpack"


class WireDecodeError(Exception):
    """Bytes that are not a known message of this wire version."""


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """Router -> worker: one sequence to generate. `sampling` holds SamplingParams field names
    (the router does not import the engine); exactly one of prompt / prompt_token_ids / messages."""

    request_id: str
    sampling: dict[str, Any]
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None  # with messages: the tools the chat template renders
    # with messages: extra variables of the chat template, and its add_generation_prompt / continue_final_message
    chat_template_kwargs: dict[str, Any] | None = None
    lora_name: str | None = None  # the worker's LoRA adapter it runs with (the request's model); None: the base model
    v: int = WIRE_VERSION


@dataclass(frozen=True, slots=True)
class DeltaFrame:
    """Worker -> router: one engine Delta. logprobs: [[token_id, token, logprob, [[id, tok, lp]...]]...].
    The first delta, when asked: prompt_token_ids, and prompt_logprobs [[token_id, token, logprob,
    rank, [[id, tok, lp]...]]...] (the first token's logprob and rank None)."""

    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprobs: list | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the worker's prefix cache
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None: EOS)
    v: int = WIRE_VERSION


@dataclass(frozen=True, slots=True)
class WorkerRegistration:
    worker_id: str
    url: str
    model_name: str
    max_model_len: int
    block_size: int
    num_total_blocks: int
    # KV block geometry memory servers size their pools by: num_layers, num_kv_heads, head_dim,
    # block_size, dtype (torch dtype name).
    kv_geometry: dict[str, Any] | None = None
    model_aliases: list[str] | None = None  # more names clients may use for model_name (--served-model-name A B)
    lora_modules: dict[str, str] | None = None  # its LoRA adapters, served as models: name -> adapter directory
    eos_token_ids: list[int] | None = None  # what ends a sequence (the router's beam search needs them)
    v: int = WIRE_VERSION

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names of the base model."""
        return (self.model_name, *(self.model_aliases or ()))

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every name a request's model may be: the base model's and its LoRA adapters'."""
        return (*self.model_names, *(self.lora_modules or ()))


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A heartbeat: the worker's load as the router's policy sees it."""

    worker_id: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    outstanding_tokens: int  # generation tokens still owed to in-flight requests
    draining: bool = False
    num_spec_proposed: int = 0  # speculative decoding since the worker started: tokens proposed
    num_spec_accepted: int = 0  # ... and those the model agreed with
    num_remote_cached_blocks: int = 0  # its blocks on memory servers only cached: it gives them up when asked
    num_preemptions: int = 0  # sequences it preempted for recompute since it started
    v: int = WIRE_VERSION


@dataclass(frozen=True, slots=True)
class MemserverRegistration:
    memserver_id: str
    address: str  # transport address host:port
    device: str
    num_blocks: int
    num_free: int
    v: int = WIRE_VERSION


@dataclass(frozen=True, slots=True)
class MemserverLoad:
    memserver_id: str
    num_blocks: int
    num_free: int
    holdings: dict[str, int]  # owner (worker id) -> blocks held
    leaving: bool = False
    v: int = WIRE_VERSION


@dataclass(frozen=True, slots=True)
class BorrowRequest:
    worker_id: str
    num_blocks: int
    near: tuple[str, ...] = ()  # memservers that already hold the sequence's blocks: lend from them first
    # Blocks the sequence still needs there in all, these included (0: just these). Refused, the
    # ledger asks the other workers to give up that much of the blocks they only cache.
    need: int = 0
    v: int = WIRE_VERSION


@dataclass(frozen=True, slots=True)
class Settle:
    worker_id: str
    reservation_id: str
    num_stored: int
    # The creditor could not be reached (not a refusal): lend nothing more from it until it heartbeats
    unreachable: bool = False
    v: int = WIRE_VERSION


@dataclass(frozen=True, slots=True)
class Repay:
    worker_id: str
    memserver_id: str
    num_blocks: int
    v: int = WIRE_VERSION


_ALL = (GenerateCall, DeltaFrame, WorkerRegistration, WorkerLoad, MemserverRegistration, MemserverLoad,
        BorrowRequest, Settle, Repay)
MESSAGE_TYPES = {cls.__name__: cls for cls in _ALL}
Message = (GenerateCall | DeltaFrame | WorkerRegistration | WorkerLoad | MemserverRegistration | MemserverLoad
           | BorrowRequest | Settle | Repay)


def encode(message: Message) -> bytes:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return msgpack.packb({"t": type(message).__name__, **fields}, use_bin_type=True)


def _from_obj(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise WireDecodeError(f"expected a msgpack map, got {type(obj).__name__}")
    cls = MESSAGE_TYPES.get(obj.pop("t", None))
    if cls is None:
        raise WireDecodeError("unknown message type")
    if obj.get("v") != WIRE_VERSION:
        raise WireDecodeError(f"wire version {obj.get('v')!r}, expected {WIRE_VERSION}")
    try:
        return cls(**obj)
    except TypeError as e:
        raise WireDecodeError(f"bad {cls.__name__} fields: {e}") from e


def decode(data: bytes, expected: type | None = None) -> Message:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise WireDecodeError(f"invalid msgpack: {e}") from e
    message = _from_obj(obj)
    if expected is not None and not isinstance(message, expected):
        raise WireDecodeError(f"expected {expected.__name__}, got {type(message).__name__}")
    return message


class FrameDecoder:
    """Incremental decoder for a stream of messages: feed() raw chunks, iterate complete messages."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)

    def feed(self, chunk: bytes) -> Iterator[Message]:
        self._unpacker.feed(chunk)
        try:
            for obj in self._unpacker:
                yield _from_obj(obj)
        except (ValueError, msgpack.FormatError, msgpack.StackError) as e:
            raise WireDecodeError(f"invalid msgpack frame: {e}") from e
