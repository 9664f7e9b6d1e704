"""A request's token state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from services.worker.engine.api import FinishReason, SamplingParams
from services.worker.engine.prefix_hash import hash_root
from services.worker.engine.remote import RemoteSpan


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival: int  # admission order; the scheduler preempts the newest first
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_ids: list[int] = field(default_factory=list)  # local KV blocks, in token order
    # Spilled KV: the oldest `num_remote_tokens` tokens (whole blocks) live on memory servers.
    remote_spans: list[RemoteSpan] = field(default_factory=list)
    num_remote_tokens: int = 0
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # echo with logprobs, prompt_logprobs: per prompt token from the second on, (logprob, top, rank)
    # as scored so far; kept across preemption, so a recomputed prompt is not scored twice
    prompt_logprobs: list = field(default_factory=list)
    # Prefix caching: hashes of its first full blocks (prefix_hash), the blocks registered so far
    # (counted from its first token), and the prompt tokens its first admission found cached.
    block_hashes: list[bytes] = field(default_factory=list)
    hash_root: bytes = field(init=False)  # where its chain starts: prefix_hash.hash_root of its cache_salt
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    # Its LoRA adapter (model.lora.LoRAAdapter; None: the base model), held so that unloading the
    # adapter changes nothing for a sequence already admitted.
    lora: Any = None
    # Speculative decoding: tokens proposed to follow its last one (spec_decode), checked by the
    # next forward pass; not part of num_tokens until the model agrees with them.
    spec_token_ids: list[int] = field(default_factory=list)
    # Refused spills in a row (memory servers without room) and, after one, the scheduler clock's
    # time before which it is not admitted again: each try recomputes what it had spilled.
    num_spill_refusals: int = 0
    admit_after: float = 0.0

    def __post_init__(self) -> None:
        self.hash_root = hash_root(self.sampling.cache_salt, self.lora.cache_key if self.lora is not None else None)

    @property
    def order(self) -> tuple[int, int]:
        """Who goes first: the lower priority number (vLLM's), then the earlier arrival."""
        return self.sampling.priority, self.arrival

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end); past num_tokens, its proposed tokens (spec_token_ids)."""
        if end > self.num_tokens:
            num = self.num_tokens
            return self.token_ids(min(start, num), num) + self.spec_token_ids[max(start - num, 0):end - num]
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]
