"""The logprob of every prompt token given the ones before it: completions' `echo` with logprobs,
and vLLM's `prompt_logprobs` (which adds each token's rank).

Position i of a prompt predicts token i + 1, so a prefill chunk over positions [start, end)
scores tokens start + 1 .. end (the last prompt position predicts the first output token
instead, and is sampled as usual). The scores live on the sequence: a prompt recomputed after
preemption is not scored again.
"""

from __future__ import annotations

from typing import Callable

import torch

from services.worker.engine.api import TokenLogprob
from services.worker.engine.scheduler import ScheduledChunk
from services.worker.engine.sequence import Sequence


def positions_to_score(chunk: ScheduledChunk) -> tuple[int, int] | None:
    """[lo, hi): the chunk's positions whose logits score a prompt token not scored yet."""
    seq = chunk.seq
    if not seq.sampling.scores_prompt:
        return None
    lo = max(chunk.start, len(seq.prompt_logprobs))
    hi = min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1)
    return (lo, hi) if lo < hi else None


def score_prompts(chunks: list[ScheduledChunk], spans: list[tuple[int, int] | None], logits: torch.Tensor) -> None:
    """logits: [sum of span lengths, vocab] fp32, the spans' positions in chunk order. Appends
    (logprob, top-k (id, logprob) pairs, rank) per scored token to each sequence's prompt_logprobs."""
    row = 0
    for chunk, span in zip(chunks, spans):
        if span is None:
            continue
        lo, hi = span
        seq, k = chunk.seq, chunk.seq.sampling.prompt_top_k
        logprobs = torch.log_softmax(logits[row:row + hi - lo], dim=-1)
        row += hi - lo
        targets = torch.tensor(seq.prompt_token_ids[lo + 1:hi + 1])
        chosen = logprobs.gather(1, targets.view(-1, 1))  # [n, 1]
        ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
        chosen = chosen.view(-1).tolist()
        tops = [()] * len(chosen)
        if k:
            values, ids = torch.topk(logprobs, k, dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        seq.prompt_logprobs.extend(zip(chosen, tops, ranks))


def prompt_entries(seq: Sequence, token_text: Callable[[int], str], k: int) -> tuple[TokenLogprob, ...]:
    """Every prompt token with its logprob, rank and top-k alternatives (the first token has none:
    nothing before it predicts it)."""
    ids = seq.prompt_token_ids
    entries = [TokenLogprob(ids[0], token_text(ids[0]), None)]
    for token_id, (logprob, top, rank) in zip(ids[1:], seq.prompt_logprobs):
        entries.append(TokenLogprob(token_id, token_text(token_id), logprob,
                                    tuple((i, token_text(i), v) for i, v in top[:k]), rank))
    return tuple(entries)
