"""The DistAttention benchmark script without running clusters: its command line, its plan (how a
remote fraction becomes a local pool size) and its report tables."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from loadtest.distattention import longctx, report
from loadtest.distattention.decode_plan import LOCAL, decode_plan, local_blocks, memserver_capacity, total_blocks
from services.runtime.sizes import parse_size
from tests.launcher.up_process import REPO


def test_help_lists_both_benchmarks():
    done = subprocess.run([sys.executable, "-m", "loadtest.bench_distattention", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "decode" in done.stdout and "capacity" in done.stdout and "--contexts" in done.stdout


def test_local_pool_leaves_the_planned_fraction_remote():
    context, decode_tokens = 8000, 48
    total = total_blocks(context, decode_tokens, 16)
    assert local_blocks(context, 0.0, decode_tokens, 16) > total  # f=0: nothing ever spills
    for f in (0.5, 0.75, 0.9):
        remote = 1 - local_blocks(context, f, decode_tokens, 16) / total
        assert f - 0.02 <= remote <= f


def test_plan_puts_baselines_in_the_first_cluster_and_memservers_hold_the_remote_part():
    plan = decode_plan(8000, [0.0, 0.5, 0.75, 0.9], [1, 2], 48)
    assert [c.name for c in plan.clusters] == ["m1", "m2"]
    assert [c.label for c in plan.cases] == [LOCAL, "m1/f0", "m1/f50", "m1/f75", "m1/f90", "m2/f50", "m2/f75",
                                             "m2/f90"]
    local = plan.clusters[0].workers[0]
    assert local.name == LOCAL and not local.remote_kv
    assert [c.num_memservers for c in plan.clusters] == [1, 2]
    remote_blocks = 0.9 * total_blocks(8000, 48, 16)
    assert parse_size(memserver_capacity(8000, 0.9, 48, 16)) >= remote_blocks * 32 * 1024
    with pytest.raises(ValueError):
        decode_plan(8000, [1.0], [1], 48)


def test_spread_plan_needs_every_memserver_for_one_sequence():
    """--spread: one sequence's remote part fits on no single memserver of a 2-server cluster, but
    on both together; without it, on either one."""
    remote_bytes = math.ceil(0.75 * total_blocks(8000, 48, 16)) * 32 * 1024
    spread = decode_plan(8000, [0.75], [1, 2], 48, spread=True)
    one, two = (parse_size(c.memserver_capacity) for c in spread.clusters)
    assert one >= remote_bytes > two and 2 * two >= remote_bytes
    default = decode_plan(8000, [0.75], [1, 2], 48)
    assert all(parse_size(c.memserver_capacity) >= remote_bytes for c in default.clusters)


def test_tables_show_ratios_and_verdicts():
    plan = decode_plan(1000, [0.75], [1], 16)
    summary = [{**{"label": c.label, "num_memservers": c.num_memservers, "fraction": c.fraction,
                   "num_kv_blocks": c.num_kv_blocks}, "context": 1000, "num_ok": 1, "measured_remote_fraction": f,
                "ttft_median_s": 1.0, "itl_median_ms": ms, "itl_p90_ms": ms, "ratio_vs_local": ms / 10,
                "paired_ratios": [ms / 10]}
               for c, f, ms in zip(plan.cases, (0.0, 0.74), (10.0, 12.0))]
    assert "1.200" in report.decode_table(summary)
    assert report.decode_verdicts(summary) == ["C=1000 M=1: 75% remote decode = 1.200x all-local -> PASS "
                                               "(target <= 1.3x)"]
    rows = [{"num_memservers": m, "total_blocks": 32 * (m + 1), "theoretical_tokens": 512 * (m + 1),
             "advertised_max_context": 512 * (m + 1), "largest_served": 512 * (m + 1), "ratio": 1.0,
             "over_refused_properly": True, "leak": False} for m in range(3)]
    assert "+512" in report.capacity_table(rows)
    assert report.capacity_verdict(rows).count("PASS") == 3


def test_longctx_plans_size_prompts_in_local_capacities():
    plans = longctx.longctx_plans(32, [4, 8, 16], 2, 48)
    assert [k for k, _ in plans] == [4, 8, 16]
    for k, plan in plans:
        assert plan.context + plan.decode_tokens == k * 32 * 16
        local, spilling = plan.cases
        assert local.label == LOCAL and local.num_kv_blocks * 16 >= plan.context + plan.decode_tokens
        assert spilling.num_memservers == 2 and spilling.num_kv_blocks == 32 + 2  # capacity + decode tail
    with pytest.raises(ValueError, match="multiples"):
        longctx.longctx_plans(32, [1], 2, 48)


def test_longctx_reports_decode_speed_against_all_local():
    _, plan = longctx.longctx_plans(32, [8], 2, 48)[0]
    summary = [{**{"label": c.label, "num_memservers": c.num_memservers, "num_kv_blocks": c.num_kv_blocks},
                "context": plan.context, "measured_remote_fraction": f, "itl_median_ms": ms, "itl_p90_ms": ms,
                "paired_ratios": [ms / 10], "num_failed": 0}
               for c, f, ms in zip(plan.cases, (None, 0.87), (10.0, 12.5))]
    row = longctx.summarize(8, summary)
    assert row["local_tok_s"] == 100.0 and row["remote_tok_s"] == 80.0 and row["speed_vs_local"] == 0.8
    assert "0.800" in longctx.table([row])
    assert longctx.verdict([row]).endswith("-> PASS (target >= 0.75x)")
    assert "FAIL" in longctx.verdict([{**row, "speed_vs_local": 0.7}])
