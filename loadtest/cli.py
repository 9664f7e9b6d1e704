"""`python -m loadtest`: load an OpenAI-compatible server (kvmesh or any other) and report.

    python -m loadtest --url http://127.0.0.1:8000 --concurrency 16 --num-requests 64 \\
        --input-len 128 --output-len 128 --out results/c16
    python -m loadtest --request-rate 4 --duration 60 --workload chat
    python -m loadtest --url URL_A --compare URL_B --num-requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from loadtest import plots, report
from loadtest.bench import BenchConfig, benchmark
from loadtest.cluster_check import resolve_token
from loadtest.metrics import Slo
from loadtest.prompts import PromptFormat
from loadtest.runner import Load, RunOptions
from loadtest.workloads import Workload, WorkloadKind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (/v1 is appended)")
    target.add_argument("--model", default=None, help="default: the first of /v1/models")
    target.add_argument("--api-key", default=None)
    target.add_argument("--compare", default=None, metavar="URL2",
                        help="also run the same requests against URL2, interleaved A,B,A,B; print B/A ratios")
    target.add_argument("--compare-rounds", type=int, default=4)
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=1,
                      help="clients in a closed loop; with --request-rate, the cap on requests in flight (0: none)")
    load.add_argument("--request-rate", type=float, default=None, help="requests/s, Poisson arrivals (open loop)")
    load.add_argument("--num-requests", type=int, default=None, help="default 100 unless --duration is given")
    load.add_argument("--duration", type=float, default=None, help="seconds; no new requests after it")
    load.add_argument("--seed", type=int, default=0)
    wl = parser.add_argument_group("workload")
    wl.add_argument("--workload", choices=[k.value for k in WorkloadKind], default="fixed")
    wl.add_argument("--input-len", type=int, default=128, help="prompt tokens (fixed) or the median (chat)")
    wl.add_argument("--output-len", type=int, default=128, help="output tokens (fixed) or the median (chat)")
    wl.add_argument("--long-context-len", type=int, default=8192, help="prompt tokens of the long requests")
    wl.add_argument("--long-fraction", type=float, default=0.1, help="share of long requests (long-context)")
    wl.add_argument("--shared-prefix-len", type=int, default=0,
                    help="every prompt starts with the same this many tokens (a shared system prompt or document)")
    wl.add_argument("--prompt-format", choices=[f.value for f in PromptFormat], default="auto",
                    help="token-id prompts (exact lengths) or calibrated text; auto: tokens if the server takes them")
    wl.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (strict OpenAI servers)")
    slo = parser.add_argument_group("goodput SLOs (ms)")
    slo.add_argument("--slo-ttft", type=float, default=None)
    slo.add_argument("--slo-tpot", type=float, default=None)
    slo.add_argument("--slo-e2e", type=float, default=None)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="dir for report.json, table.txt, latency_cdf.png")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    out.add_argument("--cluster-token", default=None, help="kvmesh cluster token for the used-blocks check "
                     "(default $KVMESH_CLUSTER_TOKEN, else the loopback dev token)")
    out.add_argument("--no-cluster-check", action="store_true", help="skip the zero-used-blocks check")
    out.add_argument("--strict", action="store_true", help="exit 1 if any request failed or KV blocks stayed used")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    num_requests = args.num_requests if args.num_requests is not None or args.duration else 100
    return BenchConfig(
        url=args.url, model=args.model, api_key=args.api_key,
        workload=Workload(WorkloadKind(args.workload), args.input_len, args.output_len, args.long_context_len,
                          args.long_fraction, seed=args.seed, shared_prefix_len=args.shared_prefix_len),
        load=Load(args.concurrency, args.request_rate, num_requests, args.duration, seed=args.seed),
        options=RunOptions(ignore_eos=not args.no_ignore_eos, timeout_s=args.timeout,
                           show_progress=not args.no_progress),
        slo=Slo(args.slo_ttft, args.slo_tpot, args.slo_e2e), prompt_format=PromptFormat(args.prompt_format),
        cluster_token=None if args.no_cluster_check else resolve_token(args.cluster_token),
        compare_url=args.compare, compare_rounds=args.compare_rounds,
    )


def render(rep: dict) -> str:
    if "summaries" in rep:
        a, b = rep["targets"]
        parts = [report.table(rep["summaries"][t["label"]], f"{t['label']}: {t['url']}") for t in (a, b)]
        parts.append(report.compare_table(a["url"], b["url"], rep["summaries"]["A"], rep["summaries"]["B"],
                                          rep["ratios_b_over_a"]))
        return "\n\n".join(parts)
    return report.table(rep["summary"], f"{rep['target']['url']} ({rep['target']['model']})")


def failed(rep: dict) -> bool:
    summaries = rep["summaries"].values() if "summaries" in rep else [rep["summary"]]
    return any(s["num_failed"] or not s.get("cluster_check", {}).get("ok", True) for s in summaries)


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    try:
        rep, runs = asyncio.run(benchmark(config))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 1
    text = render(rep)
    print(text, flush=True)
    if args.out is not None:
        report.write_json(args.out / "report.json", rep)
        (args.out / "table.txt").write_text(text + "\n")
        plots.latency_cdfs(runs, args.out / "latency_cdf.png")
        print(f"\nwrote {args.out}/report.json, table.txt, latency_cdf.png", flush=True)
    return 1 if args.strict and failed(rep) else 0
