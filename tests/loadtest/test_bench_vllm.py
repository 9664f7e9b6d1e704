"""The kvmesh-vs-vLLM benchmark's pure parts: ratios over rounds, targets, tables, chat prompt fitting."""

from __future__ import annotations

import pytest

from loadtest.bench_vllm import build_parser
from loadtest.peer import compare
from loadtest.peer.chat import fit_text
from loadtest.peer.driver import Endpoint


def _summary(tok_s, ttft50, itl50, ttft99=None, itl99=None, n=64, failed=0, prompt=128, out=128):
    return {"output_throughput": tok_s, "tpot_ms": {"p50": itl50},
            "num_completed": n, "num_failed": failed, "errors": {},
            "total_input_tokens": n * prompt, "total_output_tokens": n * out,
            "ttft_ms": {"p50": ttft50, "p99": ttft99 or 2 * ttft50},
            "itl_ms": {"p50": itl50, "p99": itl99 or 3 * itl50}}


def _case(concurrency, rounds, endpoint="completions", dtype="bfloat16"):
    case = {"dtype": dtype, "endpoint": endpoint, "concurrency": concurrency, "rounds": rounds, "notes": []}
    return case | {"stats": compare.case_stats(rounds)}


ROUNDS_C16 = [  # kvmesh 10% slower, then 20% faster, then equal on throughput
    {"kvmesh": _summary(900, 120, 9.0), "peer": _summary(1000, 100, 8.0)},
    {"kvmesh": _summary(1200, 80, 8.0), "peer": _summary(1000, 100, 8.0)},
    {"kvmesh": _summary(1500, 150, 8.0), "peer": _summary(1500, 100, 8.0)},
]


def test_case_stats_gives_min_median_max_of_per_round_ratios():
    stats = compare.case_stats(ROUNDS_C16)
    assert stats["output tok/s"]["ratio"] == pytest.approx({"min": 0.9, "median": 1.0, "max": 1.2})
    assert stats["TTFT p50 ms"]["ratio"] == pytest.approx({"min": 0.8, "median": 1.2, "max": 1.5})
    assert stats["output tok/s"]["kvmesh"] == {"min": 900, "median": 1200, "max": 1500}
    assert stats["ITL p99 ms"]["peer"]["median"] == pytest.approx(24.0)


def test_case_stats_without_a_peer_has_no_ratio():
    stats = compare.case_stats([{"kvmesh": _summary(100, 10, 5)}])
    assert stats["output tok/s"] == {"kvmesh": {"min": 100, "median": 100, "max": 100}, "peer": None, "ratio": None}


def test_missing_values_are_left_out_not_zero():
    rounds = [{"kvmesh": _summary(100, 10, 5) | {"itl_ms": None}, "peer": _summary(100, 10, 5)},
              {"kvmesh": _summary(100, 10, 6), "peer": _summary(100, 10, 5)}]
    assert compare.case_stats(rounds)["ITL p50 ms"]["ratio"] == pytest.approx({"min": 1.2, "median": 1.2, "max": 1.2})
    assert compare.ratio(1.0, 0.0) is None and compare.ratio(None, 1.0) is None


def test_targets_use_the_median_ratio_and_the_right_direction():
    c1 = _case(1, [{"kvmesh": _summary(200, 20, 4.0), "peer": _summary(200, 20, 5.0)}])
    c16 = _case(16, ROUNDS_C16)
    rows = {(r["metric"], r["concurrency"]): r for r in compare.evaluate_targets([c1, c16])}
    assert set(rows) == {("output tok/s", 16), ("ITL p50 ms", 1), ("TTFT p50 ms", 16)}
    assert rows["output tok/s", 16]["passed"] is True  # median 1.0 >= 1.0
    assert rows["ITL p50 ms", 1]["passed"] is True and rows["ITL p50 ms", 1]["median_ratio"] == pytest.approx(0.8)
    assert rows["TTFT p50 ms", 16]["passed"] is False  # median 1.2 > 1.0
    text = compare.targets_table(list(rows.values()))
    assert "FAIL  TTFT p50 ms at c=16 <= 1x vLLM" in text and "PASS  output tok/s at c=16 >= 1x vLLM" in text


def test_a_target_without_a_peer_is_not_applicable():
    rows = compare.evaluate_targets([_case(16, [{"kvmesh": _summary(100, 10, 5)}])])
    assert {r["passed"] for r in rows} == {None}
    assert "n/a" in compare.targets_table(rows)


def test_prompt_check_flags_inexact_token_counts_and_failures():
    assert compare.prompt_check(_summary(1, 1, 1), 128, 128) is None
    assert "prompt tokens" in compare.prompt_check(_summary(1, 1, 1, prompt=131), 128, 128)
    assert "output tokens" in compare.prompt_check(_summary(1, 1, 1, out=127), 128, 128)
    assert "failed" in compare.prompt_check(_summary(1, 1, 1, failed=2), 128, 128)


def test_case_table_shows_medians_and_ratio_spread():
    text = compare.case_table(_case(16, ROUNDS_C16, endpoint="chat"))
    assert "bfloat16, chat, c=16 (3 rounds)" in text
    row = next(line for line in text.splitlines() if line.startswith("output tok/s"))
    assert "1,200.0" in row and "1,000.0" in row and "0.90 / 1.00 / 1.20" in row


def test_fit_text_hits_the_exact_count():
    def count(text: str) -> int:  # a template of 5 tokens, ~1 token per 4 characters
        return 5 + (len(text) + 3) // 4

    for seed in range(20):
        assert count(fit_text(count, 128, seed)) == 128
    assert fit_text(count, 128, 3) == fit_text(count, 128, 3)
    assert fit_text(count, 128, 3) != fit_text(count, 128, 4)


def test_fit_text_raises_when_no_exact_fit_exists():
    with pytest.raises(ValueError, match="exactly 128"):
        fit_text(lambda text: 2 * len(text.split()) + 1, 128, 0)  # only odd counts


def test_list_flags_parse_comma_separated():
    args = build_parser().parse_args(["--dtypes", "bfloat16", "--endpoints", "chat", "--concurrency", "1,4"])
    assert args.dtypes == ["bfloat16"] and args.endpoints == [Endpoint.CHAT] and args.concurrency == [1, 4]
    assert build_parser().parse_args([]).endpoints == [Endpoint.COMPLETIONS, Endpoint.CHAT]


def test_restat_recomputes_stats_and_targets_and_drops_cases_without_rounds():
    rep = {"cases": [{"dtype": "float32", "endpoint": "chat", "concurrency": 16, "rounds": ROUNDS_C16, "notes": []},
                     {"dtype": "float32", "endpoint": "chat", "concurrency": 1, "rounds": [], "notes": []}]}
    out = compare.restat(rep)
    assert len(out["cases"]) == 1 and out["cases"][0]["stats"]["output tok/s"]["ratio"]["median"] == pytest.approx(1.0)
    assert {(r["metric"], r["passed"]) for r in out["targets"]} == {("output tok/s", True), ("TTFT p50 ms", False)}


def test_a_server_delivering_in_bursts_is_flagged_under_its_case():
    """vLLM's CPU build often flushes two SSE events in one read: half its gaps are ~0, so its ITL
    p50 collapses. The table says so instead of leaving a 400x ratio unexplained."""
    rounds = [{"kvmesh": _summary(250, 15, 4.0) | {"itl_burst_share": 0.01},
               "peer": _summary(240, 18, 0.01) | {"itl_burst_share": share}} for share in (0.5, 0.6, 0.1)]
    text = compare.case_table(_case(1, rounds))
    notes = [line for line in text.splitlines() if "bursts" in line]
    assert len(notes) == 1 and notes[0].startswith("  note: vLLM delivered 50% of its tokens in bursts")
    calm = [{"kvmesh": r["kvmesh"], "peer": r["peer"] | {"itl_burst_share": 0.05}} for r in rounds]
    assert "bursts" not in compare.case_table(_case(1, calm))


def test_burst_share_counts_near_zero_gaps():
    from loadtest.metrics import burst_share

    assert burst_share([0.004, 0.00001, 0.0035, 0.00002]) == 0.5
    assert burst_share([]) is None
