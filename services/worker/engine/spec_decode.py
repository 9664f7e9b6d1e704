"""Speculative decoding with n-gram proposals (vLLM's "ngram" method, also called prompt lookup).

A decoding sequence whose last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
occurred earlier in its prompt or output proposes the tokens that followed that occurrence. One
forward pass computes the sequence's last token and the proposals together; each proposal is kept
while it equals what the model itself picks at its position, and the first token the model picks
differently ends the run. Greedy output is therefore identical with and without speculation, and a
step yields up to 1 + num_speculative_tokens tokens for the cost of one wider pass.

Pure Python: the engine asks, the index answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from services.worker.engine.api import Delta, SamplingParams

MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """vLLM's --speculative-config for method "ngram"."""

    num_speculative_tokens: int
    prompt_lookup_min: int
    prompt_lookup_max: int
    # vLLM's: no proposals in a step with more running sequences than this (None: always). A wider
    # pass costs more as the batch grows; the embedded model on 2 cores: 2.4x at 1 sequence, 1.1x
    # at 8, 0.9x at 16 (python -m services.worker.bench_spec).
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"--speculative-config: num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("--speculative-config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError("--speculative-config: disable_by_batch_size must be >= 1, got "
                             f"{self.disable_by_batch_size}")

    @classmethod
    def parse(cls, text: str) -> SpeculativeConfig:
        """vLLM's JSON: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
        "prompt_lookup_min": m, "disable_by_batch_size": b}; a missing bound takes the other's value
        (both missing: 5)."""
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--speculative-config is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ValueError("--speculative-config must be a JSON object")
        if obj.get("method") not in ("ngram", "[ngram]"):
            raise ValueError(f"--speculative-config: method {obj.get('method')!r} is not supported; kvmesh speculates "
                             "with 'ngram' (no draft model)")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"--speculative-config: unsupported keys {unknown}")
        if "num_speculative_tokens" not in obj:
            raise ValueError("--speculative-config needs num_speculative_tokens")
        lo, hi = obj.get("prompt_lookup_min"), obj.get("prompt_lookup_max")
        lo, hi = (lo if lo is not None else hi), (hi if hi is not None else lo)
        values = (obj["num_speculative_tokens"], lo if lo is not None else 5, hi if hi is not None else 5)
        cap = obj.get("disable_by_batch_size")
        if not all(type(v) is int for v in (*values, cap if cap is not None else 0)):
            raise ValueError(f"--speculative-config: expected integers, got {obj}")
        return cls(*values, cap)


class NgramIndex:
    """Where each n-gram (n in [min_n, max_n]) of a growing token list last occurred, so that a
    proposal costs max_n - min_n + 1 lookups, not a scan of the context."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # per n: n-gram -> the position right after its latest occurrence that has a token after it
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def extend(self, token_ids: list[int]) -> None:
        tokens = self.tokens
        for token in token_ids:
            tokens.append(token)
            end = len(tokens) - 1  # the n-grams ending before this token now have a continuation
            for n, table in self._next.items():
                if end >= n:
                    table[tuple(tokens[end - n:end])] = end

    def propose(self, k: int) -> list[int]:
        """k tokens that followed the latest earlier occurrence of the longest matching suffix (none
        without a match). Past the end of the context the proposal repeats itself: a suffix seen p
        tokens back proposes a loop of period p."""
        tokens = self.tokens
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) <= n:
                continue
            pos = self._next[n].get(tuple(tokens[-n:]))
            if pos is not None:
                out: list[int] = []
                for j in range(pos, pos + k):
                    out.append(tokens[j] if j < len(tokens) else out[j - len(tokens)])
                return out
        return []


def speculates(params: SamplingParams) -> bool:
    """Requests whose next token's distribution depends only on the model's logits and the
    sampling settings (temperature, top_k, top_p, min_p): no penalties, bias, allowed or bad words,
    min_tokens, grammar or prompt scoring; logprobs only when greedy (each row's come with it).
    Not a seeded sampled request: checking proposals draws other random numbers than sampling one
    token a step, and where proposals fall depends on the steps (a preemption, a recompute after a
    memory server is lost), so its text would no longer be a function of its seed."""
    return (not params.uses_history and (params.logprobs is None or params.greedy) and not params.min_tokens
            and (params.greedy or params.seed is None) and not params.bad_words and params.structured is None
            and not params.scores_prompt and params.max_tokens > 1)


@dataclass(slots=True)
class SpecStats:
    """Proposed and accepted tokens since the engine started (vLLM's acceptance rate)."""

    num_checks: int = 0  # sequence-steps that checked proposed tokens
    num_proposed: int = 0
    num_accepted: int = 0

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_checks += 1
        self.num_proposed += num_proposed
        self.num_accepted += num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0


def merge_deltas(deltas: list[Delta]) -> Delta:
    """One step's deltas of one request, as one: its tokens and text in order, the last one's
    counts and ending, the first one's prompt fields."""
    if len(deltas) == 1:
        return deltas[0]
    first, last = deltas[0], deltas[-1]
    logprobs = None if all(d.logprobs is None for d in deltas) else tuple(lp for d in deltas for lp in d.logprobs or ())
    return replace(last, token_ids=tuple(t for d in deltas for t in d.token_ids), text="".join(d.text for d in deltas),
                   logprobs=logprobs, prompt_token_ids=first.prompt_token_ids, prompt_logprobs=first.prompt_logprobs)
