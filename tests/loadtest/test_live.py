"""The load generator against live local clusters (router + worker processes on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys

from services.launch import probe
from tests.launcher.up_process import REPO
from tests.loadtest.conftest import TOKEN


def run_loadtest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest", "--no-progress", "--cluster-token", TOKEN, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_duration_bounded_run_reports_metrics_and_no_used_blocks(cluster, tmp_path):
    done = run_loadtest("--url", cluster.url, "--concurrency", "4", "--duration", "3", "--input-len", "64",
                        "--output-len", "16", "--out", str(tmp_path), "--strict")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    s = report["summary"]
    assert report["prompt_format"] == "tokens"
    assert s["num_completed"] >= 4 and s["num_failed"] == 0 and s["errors"] == {}
    assert s["total_input_tokens"] == 64 * s["num_completed"]  # token-id prompts: exact lengths
    assert s["total_output_tokens"] == 16 * s["num_completed"]  # ignore_eos: exactly max_tokens
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert s[key] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[key]) == {"mean", "p50", "p90", "p99"}
    assert s["cluster_check"]["checked"] and s["cluster_check"]["num_used_blocks"] == 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
    assert "used KV blocks after run        0 (ok" in done.stdout
    assert probe.cluster_view(cluster.url, TOKEN).num_used_blocks == 0


def test_poisson_long_context_mix_reports_errors_by_kind(cluster, tmp_path):
    """Long prompts beyond the worker's 4096-token KV capacity fail with a 4xx (until memservers);
    the rest succeed and nothing leaks."""
    done = run_loadtest("--url", cluster.url, "--request-rate", "20", "--num-requests", "8", "--workload",
                        "long-context", "--long-context-len", "5000", "--long-fraction", "0.5",
                        "--input-len", "32", "--output-len", "4", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    s = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert s["num_requests"] == 8 and s["num_completed"] >= 1
    assert s["num_failed"] == sum(s["errors"].values())
    assert s["cluster_check"]["num_used_blocks"] == 0


def test_compare_two_clusters_prints_ratios(cluster, cluster_b, tmp_path):
    done = run_loadtest("--url", cluster.url, "--compare", cluster_b.url, "--concurrency", "2",
                        "--num-requests", "4", "--compare-rounds", "2", "--input-len", "32", "--output-len", "8",
                        "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "B/A" in done.stdout and "output_throughput" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_rounds"] == 2
    assert {s["num_completed"] for s in report["summaries"].values()} == {4}
    assert report["ratios_b_over_a"]["output_throughput"] > 0
    assert all(s["cluster_check"]["num_used_blocks"] == 0 for s in report["summaries"].values())
