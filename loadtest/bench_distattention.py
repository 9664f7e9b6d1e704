"""DistAttention benchmarks (issue 6), on local clusters of real processes on loopback:

  decode    decode ITL vs the fraction of the KV on memservers (0/50/75/90%) with 1 and 2 memservers,
            as a ratio to an all-local worker measured in the same run (interleaved rounds)
  capacity  max servable context vs number of memservers (0..3): advertised vs total blocks x block
            size, checked by serving exactly that many tokens and refusing one more
  longctx   (issue 8) prompts of 4x/8x/16x the worker's local KV capacity with 2 memservers: decode
            tok/s against an all-local worker holding the same requests (not part of "all")

  python -m loadtest.bench_distattention                      # both, 8K context
  python -m loadtest.bench_distattention decode --contexts 8000,32000 --rounds 1
  python -m loadtest.bench_distattention capacity --cap-memservers 0,1,2,3
  python -m loadtest.bench_distattention longctx --local-blocks 32 --multiples 4,8,16 --rounds 3

Each measured request prefills its whole prompt: on 2 shared cores an 8K prompt takes ~3 s (the
fused CPU attention path; it was 20-110 s with the Python reference). Prefill is quadratic in the
context, so 32K is opt-in (--contexts 8000,32000). A memserver deemed lost mid-request shows up as
`sequence_recomputed` in the worker logs under --out/logs (the recomp column counts them).
Tables go to stdout; decode.json, capacity.json, longctx.json and PNG plots to --out. Exit status 1 when a
request failed or blocks leaked. Every process started is stopped on the way out (SIGTERM, then
SIGKILL), also on Ctrl-C or SIGTERM; children die with this process in any case (PDEATHSIG).
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import time
from pathlib import Path

from loadtest import report as json_report
from loadtest.distattention import capacity, decode, longctx, report
from loadtest.distattention.decode_plan import decode_plan


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_distattention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="?", choices=("all", "decode", "capacity", "longctx"), default="all")
    p.add_argument("--out", type=Path, default=Path("bench-out/distattention"))
    p.add_argument("--worker-threads", type=int, default=None, help="torch threads per worker (default: the worker's, usable cores but one)")
    p.add_argument("--memserver-threads", type=int, default=None,
                   help="torch threads per memserver (default: the memserver's, every usable core)")
    p.add_argument("--child-env", action="append", type=_env_pair, default=[], metavar="KEY=VALUE",
                   help="environment of every cluster process, repeatable (OMP_WAIT_POLICY is PASSIVE unless set, "
                        "as under `kvmesh up`)")
    g = p.add_argument_group("decode")
    g.add_argument("--contexts", type=_ints, default=[8000], help="prompt lengths, comma list (32K: 32000)")
    g.add_argument("--fractions", type=_floats, default=[0.0, 0.5, 0.75, 0.9], help="planned remote shares")
    g.add_argument("--memservers", type=_ints, default=[1, 2], help="memserver counts, one cluster each")
    g.add_argument("--decode-tokens", type=int, default=48, help="max_tokens per request (ITL samples + 1)")
    g.add_argument("--rounds", type=int, default=2, help="interleaved rounds; one request per case per round")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-local", action="store_true", help="skip the --no-remote-kv worker (f=0 is the baseline)")
    g.add_argument("--spread", action="store_true",
                   help="size each of M memservers for 1/M of the remote part, so one sequence spreads over all "
                        "M (by default any one server holds it, and the ledger keeps a sequence on one)")
    g = p.add_argument_group("longctx (also uses --decode-tokens, --rounds, --seed)")
    g.add_argument("--local-blocks", type=int, default=32, help="the spilling worker's local KV pool (blocks)")
    g.add_argument("--multiples", type=_ints, default=[4, 8, 16], help="prompt sizes in local capacities")
    g.add_argument("--long-memservers", type=int, default=2)
    g = p.add_argument_group("capacity")
    g.add_argument("--cap-memservers", type=_ints, default=[0, 1, 2, 3])
    g.add_argument("--cap-worker-blocks", type=int, default=32, help="the worker's local pool (blocks)")
    g.add_argument("--cap-memserver-capacity", default="1MiB", help="per memserver (tiny: 32 KiB a block)")
    g.add_argument("--cap-max-tokens", type=int, default=4)
    return p


def run_decode(args: argparse.Namespace, token: str) -> bool:
    summaries, everything, healthy = [], [], True
    for ctx in args.contexts:
        plan = decode_plan(ctx, args.fractions, args.memservers, args.decode_tokens,
                           worker_threads=args.worker_threads, with_local=not args.no_local,
                           env=tuple(args.child_env), memserver_threads=args.memserver_threads,
                           spread=args.spread)
        print(f"== decode, context {ctx:,} tokens, {args.decode_tokens} decode tokens, {args.rounds} round(s), "
              f"{len(plan.cases)} cases", flush=True)
        t0 = time.perf_counter()
        with decode.running(plan, args.out / "logs", token) as clusters:
            rows, leaks = decode.run_rounds_sync(plan, clusters, args.rounds, args.seed)
            recomputes = decode.recompute_counts(plan, clusters)
        summary = [{**s, "num_recomputes": recomputes[s["label"]]} for s in decode.summarize(plan, rows)]
        healthy &= not leaks and all(r["ok"] for r in rows)
        summaries += summary
        everything.append({"context": ctx, "memserver_capacity": plan.memserver_capacity, "rows": rows,
                           "leaks": leaks, "wall_s": time.perf_counter() - t0})
        json_report.write_json(args.out / "decode.json", {"args": _jsonable(args), "summary": summaries,
                                                          "runs": everything})
        print(f"== context {ctx:,} done in {time.perf_counter() - t0:.0f}s", flush=True)
    print("\n" + report.decode_table(summaries))
    for line in report.decode_verdicts(summaries):
        print(line)
    print(f"plot: {report.decode_plot(summaries, args.out / 'decode_vs_remote_fraction.png')}")
    return healthy


def run_longctx(args: argparse.Namespace, token: str) -> bool:
    plans = longctx.longctx_plans(args.local_blocks, args.multiples, args.long_memservers, args.decode_tokens,
                                  worker_threads=args.worker_threads, env=tuple(args.child_env),
                                  memserver_threads=args.memserver_threads)
    rows, runs, healthy = [], [], True
    for k, plan in plans:
        print(f"== longctx {k}x local capacity ({args.local_blocks} blocks): context {plan.context:,} + "
              f"{plan.decode_tokens} decode tokens, {args.long_memservers} memservers, {args.rounds} round(s)",
              flush=True)
        t0 = time.perf_counter()
        with decode.running(plan, args.out / "logs", token) as clusters:
            raw, leaks = decode.run_rounds_sync(plan, clusters, args.rounds, args.seed)
            recomputes = decode.recompute_counts(plan, clusters)
        summary = [{**s, "num_recomputes": recomputes[s["label"]]} for s in decode.summarize(plan, raw)]
        rows.append(longctx.summarize(k, summary))
        healthy &= not leaks and all(r["ok"] for r in raw)
        runs.append({"multiple": k, "context": plan.context, "rows": raw, "leaks": leaks,
                     "wall_s": time.perf_counter() - t0})
        json_report.write_json(args.out / "longctx.json", {"args": _jsonable(args), "summary": rows, "runs": runs})
        print(f"== {k}x done in {time.perf_counter() - t0:.0f}s", flush=True)
    print("\n" + longctx.table(rows))
    print(longctx.verdict(rows))
    return healthy


def run_capacity(args: argparse.Namespace, token: str) -> bool:
    print(f"== capacity: worker {args.cap_worker_blocks} blocks, memservers of {args.cap_memserver_capacity}, "
          f"M = {args.cap_memservers}", flush=True)
    rows = capacity.run(args.cap_memservers, args.cap_worker_blocks, args.cap_memserver_capacity,
                        args.cap_max_tokens, args.out / "logs", token, args.worker_threads, tuple(args.child_env))
    json_report.write_json(args.out / "capacity.json", {"args": _jsonable(args), "rows": rows})
    print("\n" + report.capacity_table(rows))
    print(report.capacity_verdict(rows))
    print(f"plot: {report.capacity_plot(rows, args.out / 'max_context_vs_memservers.png')}")
    return not any(r["leak"] for r in rows)


def _jsonable(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the clusters' finally blocks stop them
    args.out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)  # this run's clusters only
    healthy = True
    if args.bench in ("all", "capacity"):
        healthy &= run_capacity(args, token)
    if args.bench in ("all", "decode"):
        healthy &= run_decode(args, token)
    if args.bench == "longctx":
        healthy &= run_longctx(args, token)
    print(f"results in {args.out.resolve()}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
