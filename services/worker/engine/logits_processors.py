"""Per-request edits of a row of logits before sampling: logit bias, then the repetition,
frequency and presence penalties, in vLLM's order. Rows that ask for none of them are never
touched (the batched greedy path stays one argmax).

- logit_bias (OpenAI): ``logit[t] += bias[t]``.
- repetition_penalty (transformers' RepetitionPenaltyLogitsProcessor, vLLM): for every token of
  the prompt and of the output so far, ``logit / p`` if it is positive, else ``logit * p``.
- frequency_penalty, presence_penalty (OpenAI, vLLM), over the output so far only:
  ``logit[t] -= frequency * count[t] + presence * (count[t] > 0)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.engine.api import SamplingParams


def apply_processors(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                     output_ids: Sequence[int]) -> None:
    """Edit ``logits`` ([V] fp32, one row) in place."""
    vocab = logits.shape[0]
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits.index_add_(0, torch.tensor(ids), torch.tensor(biases, dtype=logits.dtype))
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([*prompt_ids, *output_ids], dtype=torch.long)
        scores = logits.index_select(0, seen)
        p = params.repetition_penalty
        logits.index_copy_(0, seen, torch.where(scores < 0, scores * p, scores / p))
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
