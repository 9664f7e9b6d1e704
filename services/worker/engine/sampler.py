"""Token sampling: greedy, temperature, min-p, top-k, top-p, per-request seeded generators, logprobs;
penalties and logit bias first (services.worker.engine.logits_processors)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.worker.engine.api import SamplingParams
from services.worker.engine.logits_processors import TokenHistory, apply_processors


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_id: int
    logprob: float | None  # of the chosen token under the model's distribution
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first


@dataclass(frozen=True, slots=True)
class SampleFailed:
    """A row whose sampling raised: its request ends with this error, the batch goes on."""

    error: str


_ARGMAX_CHUNK = 128
_FLOAT_MAX = torch.finfo(torch.float32).max


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) (first index of the maximum, NaN counted as maximal), ~8x faster
    on CPU: its indexed reduction is scalar code, while amax is vectorised. The max of every
    128-wide chunk picks the first chunk holding the row's maximum; argmax runs only inside it."""
    # logits: [N, V] fp32 -> [N] int64
    num_rows, vocab = logits.shape
    pad = (-vocab) % _ARGMAX_CHUNK
    padded = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")) if pad else logits
    chunks = padded.view(num_rows, -1, _ARGMAX_CHUNK)
    best = chunks.amax(dim=-1).argmax(dim=-1)  # [N]
    within = chunks[torch.arange(num_rows), best].argmax(dim=-1)
    return best * _ARGMAX_CHUNK + within


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # logits: [V] fp32, already divided by the temperature
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p  # keeps the crossing token
        drop_sorted[0] = False  # a top_p under float32's smallest (1e-300 reads as 0) would drop every token
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [N, V] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    banned: list[tuple[int, ...]],  # per row: ids masked out (EOS/stop ids before min_tokens)
    histories: list[TokenHistory | None] | None = None,  # per row: its tokens, for penalties
    constrain: Callable[[torch.Tensor], None] | None = None,  # masks disallowed tokens of [N, V] in place
) -> list[SampleResult | SampleFailed]:
    """Logprobs are the model's (after the min_tokens mask, before a structured output's mask,
    penalties and bias), as vLLM's default; the choice is made on the edited logits. A row gets
    its penalties and bias when it has a history (the caller gives one where ``params.uses_history``)."""
    for row, ids in enumerate(banned):
        if ids:
            logits[row, list(ids)] = float("-inf")
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if constrain is not None:
        constrain(logits)
    for row, history in enumerate(histories or ()):
        if history is not None:
            apply_processors(logits[row], params[row], history)
    best = greedy_argmax(logits)
    greedy = best.tolist()
    # A mask may leave a row no token at all (a grammar's stop token banned by min_tokens): its
    # argmax would be an arbitrary masked token.
    none_allowed = (logits.gather(1, best.unsqueeze(1)).squeeze(1) == float("-inf")).tolist() if constrain else None
    results: list[SampleResult | SampleFailed] = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if none_allowed is not None and none_allowed[row]:
            results.append(SampleFailed("no token is allowed: the structured output's grammar and the tokens "
                                        "banned until min_tokens exclude every token"))
            continue
        if p.logprobs is None and p.greedy:  # most rows: nothing can fail
            results.append(SampleResult(greedy[row], None, ()))
            continue
        try:
            results.append(_sample_row(row, p, gen, logits, greedy, logprobs))
        except RuntimeError as e:  # e.g. multinomial on a NaN row: that request fails, not the step
            results.append(SampleFailed(f"sampling failed: {e}"))
    return results


def _sample_row(row: int, p: SamplingParams, gen: torch.Generator | None, logits: torch.Tensor, greedy: list[int],
                logprobs: torch.Tensor | None) -> SampleResult:
    if p.greedy:
        token = greedy[row]
    else:
        # A logit pushed to +inf (e.g. by a tiny repetition_penalty) would make softmax NaN
        # and multinomial raise: it becomes the largest float, a NaN excluded.
        scaled = torch.nan_to_num(logits[row] / p.temperature, nan=float("-inf"), posinf=_FLOAT_MAX)
        probs = torch.softmax(_filter(scaled, p), dim=-1)
        token = int(torch.multinomial(probs, 1, generator=gen).item())
    if p.logprobs is None:
        return SampleResult(token, None, ())
    row_lp = logprobs[row]
    top = ()
    if p.logprobs > 0:
        values, ids = torch.topk(row_lp, p.logprobs)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return SampleResult(token, float(row_lp[token]), top)


def sample_proposed(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None,
                    proposed: list[int]) -> list[SampleResult | SampleFailed]:
    """Speculative sampling of a sampled (not greedy) request's proposed tokens, exact in
    distribution: logits [len(proposed) + 1, V] fp32, row i scoring the token after proposal i - 1.
    A proposal is a certainty (n-grams, no draft model), so proposal i is kept with probability
    p_i(proposal); the first one refused is replaced by a draw from p_i without it, and if all are
    kept a last token is drawn from the final row. Returns the tokens taken, in order."""
    results: list[SampleResult | SampleFailed] = []
    try:
        for i, row in enumerate(logits):
            scaled = torch.nan_to_num(row / p.temperature, nan=float("-inf"), posinf=_FLOAT_MAX)
            probs = torch.softmax(_filter(scaled, p), dim=-1)
            if i == len(proposed):
                results.append(SampleResult(int(torch.multinomial(probs, 1, generator=gen).item()), None, ()))
                break
            token = proposed[i]
            if float(torch.rand(1, generator=gen).item()) < float(probs[token]):
                results.append(SampleResult(token, None, ()))
                continue
            probs[token] = 0.0  # refused: p_i without it (not all zero: probs[token] < 1)
            results.append(SampleResult(int(torch.multinomial(probs, 1, generator=gen).item()), None, ()))
            break
    except RuntimeError as e:  # e.g. a NaN row: that request fails, not the step
        results.append(SampleFailed(f"sampling failed: {e}"))
    return results
