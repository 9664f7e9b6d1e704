"""The load generator's pure parts: workloads, prompts, metrics, tables."""

from __future__ import annotations

import pytest

from loadtest.client import RequestResult
from loadtest.metrics import Slo, percentile, ratios, summarize
from loadtest.prompts import PromptBuilder, PromptFormat
from loadtest.report import compare_table, table
from loadtest.runner import Load
from loadtest.workloads import Workload, WorkloadKind


def _result(i, ok=True, ttft=0.1, e2e=1.1, out=11, itls=(0.1,) * 10, error_kind=None):
    return RequestResult(i, "A", 0.0, 128, ok=ok, ttft_s=ttft, e2e_s=e2e, num_output_tokens=out if ok else 0,
                         itls_s=list(itls), error_kind=error_kind)


def test_fixed_workload_is_exact_and_chat_workload_is_seeded():
    assert Workload().spec(5).num_prompt_tokens == 128
    chat = Workload(WorkloadKind.CHAT, seed=3)
    assert chat.specs(0, 50) == Workload(WorkloadKind.CHAT, seed=3).specs(0, 50)
    lengths = {s.num_prompt_tokens for s in chat.specs(0, 50)}
    assert len(lengths) > 10 and max(lengths) <= chat.max_input_len


def test_long_context_mix_has_the_requested_share_of_long_prompts():
    wl = Workload(WorkloadKind.LONG_CONTEXT, long_context_len=20000, long_fraction=0.25)
    specs = wl.specs(0, 400)
    longs = [s for s in specs if s.is_long]
    assert all(s.num_prompt_tokens == 20000 for s in longs)
    assert 60 < len(longs) < 140


def test_token_prompts_have_the_exact_length_and_differ_between_requests():
    builder = PromptBuilder(PromptFormat.TOKENS, seed=1)
    a, b = builder.build(0, 128), builder.build(1, 128)
    assert len(a) == len(b) == 128 and a != b
    assert builder.build(0, 128) == a
    assert len(PromptBuilder(PromptFormat.TEXT, words_per_token=0.5).build(0, 100).split()) == 50


def test_a_shared_prefix_starts_every_prompt_and_the_rest_differs():
    builder = PromptBuilder(PromptFormat.TOKENS, seed=1, shared_prefix_len=100)
    a, b, short = builder.build(0, 128), builder.build(1, 130), builder.build(2, 40)
    assert a[:100] == b[:100] and short == a[:40]
    assert len(a) == 128 and len(b) == 130 and a[100:] != b[100:128]
    words = PromptBuilder(PromptFormat.TEXT, words_per_token=0.5, shared_prefix_len=60)
    x, y = words.build(0, 100).split(), words.build(1, 100).split()
    assert len(x) == len(y) == 50 and x[:30] == y[:30] and x[30:] != y[30:]


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_summarize_reports_vllm_bench_figures_and_errors_by_kind():
    results = [_result(0), _result(1, ttft=0.3, e2e=1.3), _result(2, ok=False, error_kind="http_429"),
               _result(3, ok=False, error_kind="http_429"), _result(4, ok=False, error_kind="timeout")]
    s = summarize(results, duration_s=2.0)
    assert (s["num_completed"], s["num_failed"]) == (2, 3)
    assert s["errors"] == {"http_429": 2, "timeout": 1}
    assert s["output_throughput"] == pytest.approx(11.0)
    assert s["total_token_throughput"] == pytest.approx((22 + 256) / 2)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert "goodput" not in s


def test_goodput_counts_requests_within_every_slo():
    results = [_result(0, ttft=0.1), _result(1, ttft=0.5), _result(2, ok=False, error_kind="timeout")]
    s = summarize(results, 1.0, Slo(ttft_ms=200, tpot_ms=150))
    assert s["num_good"] == 1 and s["goodput"] == pytest.approx(1.0)


def test_ratios_and_tables_render():
    a = summarize([_result(0)], 1.0)
    b = summarize([_result(0, ttft=0.2, e2e=1.2)], 2.0)
    r = ratios(a, b)
    assert r["request_throughput"] == pytest.approx(0.5) and r["ttft_ms.p50"] == pytest.approx(2.0)
    assert "0.500x" in compare_table("a", "b", a, b, r)
    assert "TTFT (ms)" in table(a, "x") and "output throughput" in table(a)


def test_load_must_be_bounded():
    with pytest.raises(ValueError, match="bound the run"):
        Load(num_requests=None, duration_s=None)


def test_a_negative_shared_prefix_is_refused_with_a_message_naming_it(capsys):
    import argparse

    from loadtest import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--url", "http://127.0.0.1:9", "--shared-prefix-len", "-1"])
    assert cli.main(args) == 2  # before any request is sent
    assert "shared_prefix_len must be >= 0, got -1" in capsys.readouterr().err
