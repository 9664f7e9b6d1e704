"""The chunked greedy argmax picks exactly what torch.argmax picks, ties and edge rows included."""

import pytest
import torch

from services.worker.engine.sampler import greedy_argmax


@pytest.mark.parametrize("shape", [(1, 32000), (16, 32000), (5, 32001), (3, 100), (2, 1)], ids=str)
def test_matches_torch_argmax(shape):
    gen = torch.Generator().manual_seed(shape[1])
    logits = torch.randn(shape, generator=gen)
    rows, vocab = shape
    if vocab > 1:
        top = logits.max() + 1
        logits[0, vocab - 1] = top  # the maximum in the last, partial chunk
        if rows > 1:
            logits[1, vocab // 2] = logits[1, vocab // 3] = top  # a tie: the first index wins
        if rows > 2:
            logits[2] = float("-inf")  # every token banned
    assert torch.equal(greedy_argmax(logits), torch.argmax(logits, dim=-1))


def test_nan_counts_as_maximal_like_torch():
    logits = torch.randn(2, 700)
    logits[0, 300] = float("nan")
    logits[1, 650] = float("nan")
    logits[1, 20] = float("inf")
    assert torch.equal(greedy_argmax(logits), torch.argmax(logits, dim=-1))
