"""The beam search algorithm (services.router.beam_search) against a model given as a table."""

from __future__ import annotations

import itertools
import math

import pytest

from services.router.beam_search import Beam, BeamParams, beam_score, beam_search
from services.router.protocol import parse_chat_request, parse_completion_request
from services.runtime.errors import ApiError

EOS = 0


def table_model(table: dict[tuple[int, ...], dict[int, float]], default: dict[int, float]):
    """next_tokens from a table of prefix -> {token: logprob}; prefixes not in it get `default`."""
    calls: list[tuple[int, ...]] = []

    async def next_tokens(generated: tuple[int, ...]):
        calls.append(generated)
        dist = table.get(generated, default)
        return sorted(dist.items(), key=lambda kv: -kv[1])

    next_tokens.calls = calls
    return next_tokens


async def test_width_one_is_greedy():
    model = table_model({(): {1: -0.1, 2: -0.5}, (1,): {3: -2.0, 4: -2.5}}, {5: -0.3, 6: -1.0})
    (beam,) = await beam_search(model, BeamParams(1, 3), prompt_len=4, eos_token_ids=frozenset({EOS}))
    assert beam == Beam((1, 3, 5), -0.1 - 2.0 - 0.3, False)


async def test_a_wider_beam_finds_what_greedy_misses():
    # greedy takes 1 (-0.1) and then pays -3; 2 (-0.5) leads to -0.1
    model = table_model({(): {1: -0.1, 2: -0.5}, (1,): {3: -3.0, 4: -3.5}, (2,): {3: -0.1, 4: -4.0}}, {})
    best, second = await beam_search(model, BeamParams(2, 2), prompt_len=1, eos_token_ids=frozenset())
    assert best.token_ids == (2, 3) and math.isclose(best.cum_logprob, -0.6)
    assert second.token_ids == (1, 3)
    # step 1 asked once (one live beam), step 2 once per live beam
    assert sorted(model.calls) == [(), (1,), (2,)]


async def test_eos_completes_a_beam_and_is_not_counted_in_its_length():
    model = table_model({(): {EOS: -1.0, 7: -0.2}, (7,): {8: -1.9, EOS: -2.5}}, {9: -0.5})
    beams = await beam_search(model, BeamParams(2, 3), prompt_len=3, eos_token_ids=frozenset({EOS}))
    done = [b for b in beams if b.finished]
    assert done and done[0].token_ids[-1] == EOS
    short = Beam((EOS,), -1.0, True)
    assert beam_score(short, 3, 1.0) == -1.0 / 3  # 3 prompt tokens, the EOS not counted
    ignored = await beam_search(model, BeamParams(2, 3, ignore_eos=True), prompt_len=3, eos_token_ids=frozenset({EOS}))
    assert not any(b.finished for b in ignored) and all(len(b.token_ids) == 3 for b in ignored)


async def test_length_penalty_ranks_long_and_short_answers():
    # a 1-token answer ending in EOS (-1.0) vs a 4-token one (-1.6): length_penalty decides
    model = table_model({(): {EOS: -1.0, 5: -0.4}}, {5: -0.4})
    args = dict(prompt_len=1, eos_token_ids=frozenset({EOS}))
    favour_long = await beam_search(model, BeamParams(1, 4, length_penalty=2.0), **args)
    favour_short = await beam_search(model, BeamParams(1, 4, length_penalty=0.0), **args)
    assert favour_long[0].token_ids == (5, 5, 5, 5)  # -1.6 / 5**2 beats -1.0 / 1**2
    assert favour_short[0] == Beam((EOS,), -1.0, True)  # no length normalisation: -1.0 beats -1.6


async def test_a_beam_as_wide_as_the_tree_finds_the_best_sequences_exhaustively():
    """Vocabulary 3, 3 steps, width 9 >= 3 x 3: beam search keeps every prefix, so its answer is
    the top 9 of all 27 sequences (equal lengths: ranked by total logprob)."""
    logprob = {}
    for prefix_len in range(3):
        for prefix in itertools.product(range(1, 4), repeat=prefix_len):
            raw = [math.sin(7 * len(prefix) + 3 * sum(prefix) + t) for t in range(1, 4)]
            norm = math.log(sum(math.exp(r) for r in raw))
            logprob[prefix] = {t: raw[t - 1] - norm for t in range(1, 4)}
    model = table_model(logprob, {})
    beams = await beam_search(model, BeamParams(9, 3), prompt_len=2, eos_token_ids=frozenset())
    every = sorted(itertools.product(range(1, 4), repeat=3),
                   key=lambda s: -sum(logprob[s[:i]][s[i]] for i in range(3)))
    assert [b.token_ids for b in beams] == every[:9]


LIMITS = {"max_n": 16, "max_stop": 4}


@pytest.mark.parametrize("extra, param", [
    ({"n": 11}, "n"),
    ({"logprobs": 1}, "logprobs"),
    ({"stop": ["x"]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"echo": True}, "echo"),
    ({"min_tokens": 2}, "min_tokens"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_beam_search_refuses_what_it_would_ignore(extra, param):
    with pytest.raises(ApiError) as e:
        parse_completion_request({"prompt": "x", "use_beam_search": True, **extra}, **LIMITS)
    assert e.value.status == 400 and e.value.param == param


def test_beam_search_request_fields():
    parsed = parse_completion_request({"prompt": "x", "use_beam_search": True, "n": 4, "length_penalty": 0.6,
                                       "ignore_eos": True, "temperature": 0}, **LIMITS)
    assert (parsed.n, parsed.length_penalty) == (4, 0.6)
    assert parse_completion_request({"prompt": "x", "length_penalty": 0.6}, **LIMITS).length_penalty is None
    chat = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "use_beam_search": True}, **LIMITS)
    assert chat.length_penalty == 1.0
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(ApiError, match="'tools' do not apply"):
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "use_beam_search": True,
                            "tools": tools, "tool_choice": "required"}, **LIMITS)


async def test_a_beam_whose_best_next_token_is_eos_lives_on_through_its_second_best():
    """Each beam asks for 2 x width candidates (vLLM's): an EOS among them completes an answer
    without leaving fewer than `width` beams alive."""
    model = table_model({(): {EOS: -0.19, 5: -0.2}}, {6: -0.01, EOS: -3.0})
    beams = await beam_search(model, BeamParams(1, 3), prompt_len=10, eos_token_ids=frozenset({EOS}))
    assert (5,) in model.calls and (5, 6) in model.calls  # the search went on past the EOS
    (best,) = beams  # -0.22 / 13 beats the EOS answer's -0.19 / 10
    assert best.token_ids == (5, 6, 6) and not best.finished and math.isclose(best.cum_logprob, -0.22)


async def test_a_beam_search_through_the_router_releases_each_step_on_its_worker():
    """Every one-token request of a search is closed: the router's count of tokens owed by the worker
    (its routing load) is back to zero after the answer."""
    from services.router.keys import REGISTRY
    from tests.router.stack import running_stack

    async with running_stack() as s:
        resp = await s.post("/v1/completions", {"model": "fake", "prompt": "hello", "max_tokens": 3,
                                                "use_beam_search": True})
        body = await resp.json()
        assert resp.status == 200, body
        assert [c["text"] for c in body["choices"]] == ["aaa"] and body["usage"]["completion_tokens"] == 3
        assert all(state.inflight_tokens == 0 for state in s.router.app[REGISTRY].all())
        await s.wait_blocks_free()


async def test_a_refused_beam_search_or_token_naming_field_is_a_400_and_the_router_still_answers():
    from tests.router.stack import running_stack

    async with running_stack() as s:
        for body, param in (({"use_beam_search": True, "stop": ["x"]}, "stop"),
                            ({"use_beam_search": True, "n": 11}, "n"),
                            ({"return_tokens_as_token_ids": "yes"}, "return_tokens_as_token_ids")):
            resp = await s.post("/v1/completions", {"model": "fake", "prompt": "hello", "max_tokens": 3, **body})
            error = (await resp.json())["error"]
            assert resp.status == 400 and error["param"] == param, error
        resp = await s.post("/v1/completions", {"model": "fake", "prompt": "hello", "max_tokens": 3,
                                                "use_beam_search": True})
        assert resp.status == 200 and (await resp.json())["choices"][0]["text"] == "aaa"
        async with s.client.get(s.url("/metrics")) as metrics:
            text = await metrics.text()
        # the answered beam search counts as any request; the refused ones do not
        assert 'vllm:request_success_total{finished_reason="length",model_name="fake"} 1.0' in text
        await s.wait_blocks_free()
