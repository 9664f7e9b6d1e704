"""Penalties and logit bias on a row of logits, against the formulas written out by hand."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine.api import InvalidRequest, SamplingParams
from services.worker.engine.logits_processors import TokenHistory, apply_processors as _apply_processors
from services.worker.engine.sampler import SampleFailed, sample


def apply_processors(logits, params, prompt_ids, output_ids):
    _apply_processors(logits, params, TokenHistory(logits.shape[0], prompt_ids).update(output_ids))


def _history(prompt_ids, output_ids=(), vocab=4):
    return TokenHistory(vocab, prompt_ids).update(list(output_ids))


def _row(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_untouched_without_penalties():
    logits = _row(1.0, -2.0, 3.0)
    apply_processors(logits, SamplingParams(), [0, 1], [2, 2])
    assert logits.tolist() == [1.0, -2.0, 3.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = _row(2.0, -2.0, 3.0, 4.0)
    apply_processors(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], output_ids=[1])
    assert logits.tolist() == [1.0, -4.0, 3.0, 4.0]  # token 1 seen twice: penalized once


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = _row(1.0, 1.0, 1.0, 1.0)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    apply_processors(logits, params, prompt_ids=[0, 0, 0], output_ids=[1, 2, 2, 2])
    # token 0: prompt only; token 1: once (1 - 0.5 - 0.25); token 2: three times (1 - 1.5 - 0.25)
    assert logits.tolist() == pytest.approx([1.0, 0.25, -0.75, 1.0])


def test_negative_penalties_encourage_repeats():
    logits = _row(0.0, 0.0)
    apply_processors(logits, SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5), [], [1, 1])
    assert logits.tolist() == [0.0, 2.5]


def test_logit_bias_adds_then_penalties_apply():
    logits = _row(1.0, 2.0, 3.0)
    params = SamplingParams(logit_bias=((0, 5.0), (2, -100.0)), repetition_penalty=2.0)
    apply_processors(logits, params, prompt_ids=[0], output_ids=[])
    assert logits.tolist() == [3.0, 2.0, -97.0]  # (1 + 5) / 2 for token 0


def test_sample_picks_on_edited_logits_but_reports_the_models_logprobs():
    logits = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    raw = torch.log_softmax(logits, dim=-1)
    biased = SamplingParams(temperature=0, logprobs=0, logit_bias=((2, 1.0),))
    plain = SamplingParams(temperature=0, logprobs=0)
    results = sample(logits.clone(), [biased, plain], [None, None], [(), ()], [_history([0], vocab=3), None])
    assert [r.token_id for r in results] == [2, 1]
    assert results[0].logprob == pytest.approx(raw[0, 2].item())


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, min_p=0.5)  # keeps p >= 0.25: tokens 0 and 1
    gen = torch.Generator().manual_seed(0)
    seen = {sample(logits.clone(), [params], [gen], [()])[0].token_id for _ in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-300),  # logits / t overflow: greedy below 1e-5, as vLLM
    SamplingParams(temperature=1e-6, top_p=0.5),
    SamplingParams(temperature=1.0, top_p=1e-300),  # reads as 0.0 in float32: the top token stays
    SamplingParams(temperature=1.0, repetition_penalty=1e-300),  # a seen positive logit becomes +inf
    SamplingParams(temperature=1.0, repetition_penalty=1e-300, top_p=0.9, min_p=0.5, top_k=3),
])
def test_extreme_values_sample_a_token_instead_of_failing_the_step(params):
    logits = torch.tensor([[0.5, 3.0, 1.0, -1.0]])
    results = sample(logits.clone(), [params], [torch.Generator().manual_seed(0)], [()], [_history([0, 2])])
    expected = 1 if params.repetition_penalty == 1.0 else {0, 2}  # the +inf ones win
    token = results[0].token_id
    assert token == expected if isinstance(expected, int) else token in expected


@pytest.mark.parametrize("params, field", [
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(temperature=float("inf")), "temperature"),
    (SamplingParams(presence_penalty=2.5), "presence_penalty"),
    (SamplingParams(presence_penalty=float("nan")), "presence_penalty"),
    (SamplingParams(frequency_penalty=-3), "frequency_penalty"),
    (SamplingParams(repetition_penalty=0), "repetition_penalty"),
    (SamplingParams(min_p=1.5), "min_p"),
    (SamplingParams(logit_bias=((3, 101.0),)), "logit_bias"),
])
def test_out_of_range_values_name_the_field(params, field):
    with pytest.raises(InvalidRequest) as e:
        params.validate()
    assert e.value.param == field


def test_token_ids_must_exist_in_the_vocabulary():
    with pytest.raises(InvalidRequest, match=r"logit_bias token ids must be in \[0, 10\)"):
        SamplingParams(logit_bias=((10, 1.0),)).check_token_ids(10)
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(3, 12)).check_token_ids(10)
    SamplingParams(logit_bias=((9, 1.0),), stop_token_ids=(0,)).check_token_ids(10)


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.tensor([[float("nan")] * 4, [0.0, 2.0, 1.0, 0.0]])
    p = SamplingParams(temperature=1.0)
    results = sample(logits, [p, SamplingParams(temperature=0)], [torch.Generator(), None], [(), ()])
    assert isinstance(results[0], SampleFailed) and "sampling failed" in results[0].error
    assert results[1].token_id == 1


def test_history_taken_in_a_step_at_a_time_equals_one_built_at_once():
    grown = TokenHistory(8, [1, 1, 5])
    for n in range(1, 5):
        grown.update([2, 3, 2, 7][:n])
    whole = TokenHistory(8, [1, 1, 5]).update([2, 3, 2, 7])
    assert torch.equal(grown.seen, whole.seen) and torch.equal(grown.counts, whole.counts)
    assert grown.seen.nonzero().view(-1).tolist() == [1, 2, 3, 5, 7]
    assert grown.counts.tolist() == [0, 0, 2, 1, 0, 0, 0, 1]
