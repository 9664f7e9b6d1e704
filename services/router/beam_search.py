"""vLLM's beam search (`use_beam_search`), as its OpenAI server runs it: above the engine, one
token per step. Each live beam asks for the top 2 x beam_width next tokens; the best beam_width
continuations live on, a continuation that is EOS is complete; after max_tokens steps the best
beam_width of the complete and live beams are the answer, ranked by vLLM's score
cum_logprob / len(prompt + output) ** length_penalty (EOS not counted). Pure logic: the caller
gives the model as ``next_tokens``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

# generated ids so far -> the model's top next tokens [(token id, logprob)], best first
NextTokens = Callable[[tuple[int, ...]], Awaitable[Sequence[tuple[int, float]]]]


@dataclass(frozen=True, slots=True)
class BeamParams:
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Beam:
    token_ids: tuple[int, ...]  # generated, EOS included when it ended with one
    cum_logprob: float
    finished: bool  # ended with EOS


def beam_score(beam: Beam, prompt_len: int, length_penalty: float) -> float:
    """vLLM's get_beam_search_score: the whole sequence's length, less a final EOS."""
    length = prompt_len + len(beam.token_ids) - (1 if beam.finished else 0)
    return beam.cum_logprob / max(length, 1) ** length_penalty


async def beam_search(next_tokens: NextTokens, params: BeamParams, prompt_len: int,
                      eos_token_ids: frozenset[int]) -> list[Beam]:
    """The best params.beam_width beams, best first; ties keep the model's order (deterministic)."""
    def score(beam: Beam) -> float:
        return beam_score(beam, prompt_len, params.length_penalty)

    live = [Beam((), 0.0, False)]
    complete: list[Beam] = []
    for _ in range(params.max_tokens):
        tops = await asyncio.gather(*(next_tokens(beam.token_ids) for beam in live))
        candidates = []
        for beam, top in zip(live, tops):
            for token_id, logprob in top[:2 * params.beam_width]:
                ends = token_id in eos_token_ids and not params.ignore_eos
                grown = Beam(beam.token_ids + (token_id,), beam.cum_logprob + logprob, ends)
                (complete if ends else candidates).append(grown)
        live = sorted(candidates, key=score, reverse=True)[:params.beam_width]
        if not live:
            break
    return sorted(complete + live, key=score, reverse=True)[:params.beam_width]
