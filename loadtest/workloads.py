"""What each request asks for: prompt length and output length. Pure and seeded: request i of a
workload is the same on every run and every server (what `--compare` relies on)."""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass


class WorkloadKind(enum.Enum):
    FIXED = "fixed"  # every request input_len in / output_len out
    CHAT = "chat"  # lognormal lengths shaped like chat traffic (ShareGPT-ish medians)
    LONG_CONTEXT = "long-context"  # chat-like, plus a fraction of very long prompts


@dataclass(frozen=True, slots=True)
class RequestSpec:
    index: int
    num_prompt_tokens: int
    max_tokens: int
    is_long: bool = False


@dataclass(frozen=True, slots=True)
class Workload:
    kind: WorkloadKind = WorkloadKind.FIXED
    input_len: int = 128
    output_len: int = 128
    long_context_len: int = 8192
    long_fraction: float = 0.1
    max_input_len: int = 4096  # cap for the chat distribution's tail
    seed: int = 0
    shared_prefix_len: int = 0  # every prompt starts with the same this many tokens (prompts.PromptBuilder)

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1 or self.long_context_len < 1:
            raise ValueError("input_len, output_len and long_context_len must be >= 1")
        if self.shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")

    def spec(self, index: int) -> RequestSpec:
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.kind is WorkloadKind.FIXED:
            return RequestSpec(index, self.input_len, self.output_len)
        if self.kind is WorkloadKind.LONG_CONTEXT and rng.random() < self.long_fraction:
            return RequestSpec(index, self.long_context_len, self.output_len, is_long=True)
        return RequestSpec(index, *self._chat_lengths(rng))

    def _chat_lengths(self, rng: random.Random) -> tuple[int, int]:
        # lognormal around the medians input_len / output_len, sigma ~1 (heavy right tail)
        num_in = int(rng.lognormvariate(math.log(self.input_len), 0.9))
        num_out = int(rng.lognormvariate(math.log(self.output_len), 0.7))
        return max(4, min(num_in, self.max_input_len)), max(1, min(num_out, 4 * self.output_len))

    def specs(self, start: int, count: int) -> list[RequestSpec]:
        return [self.spec(i) for i in range(start, start + count)]
