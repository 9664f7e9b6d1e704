"""The engine's public contract: what the worker service (and `kvmesh generate`) talk to.

Plain Python (no torch) so services and tests can build requests without a model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EngineError(Exception):
    """Base of request errors raised by the engine; `param` names the offending field."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(EngineError):
    code = "invalid_value"


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"


class EngineOverloaded(EngineError):
    status = 503
    code = "overloaded"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the caller
    ERROR = "error"  # the engine failed this request; see Delta.error


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    seed: int | None = None  # per-request generator: same seed, same tokens
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS / stop ids are suppressed until this many tokens exist
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus top-k alternatives

    def validate(self) -> None:
        """Raise InvalidRequest naming the field and its limit."""
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequest(f"top_k must be >= 1 (or unset), got {self.top_k}", "top_k")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequest(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}", "min_tokens"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest(f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty", "stop")


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Exactly one of prompt (text), prompt_token_ids or messages (chat, rendered with the model's
    chat template, generation prompt appended) is set."""

    request_id: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token text, logprob), best first


@dataclass(frozen=True, slots=True)
class Delta:
    """One step's output for one request. Concatenating every `text` gives the decode of all
    generated ids (minus a matched stop string); `text` never splits a UTF-8 character."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    num_prompt_tokens: int
    num_generated_tokens: int  # total so far, including this delta
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    error: str | None = None  # set with FinishReason.ERROR


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
