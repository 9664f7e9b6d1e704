"""`kvmesh up`: a local cluster in one command (router + workers + memservers), ready to serve.

    kvmesh up                          # 1 worker, 2 CPU memservers, the embedded tiny model, :8000
    kvmesh up --memservers 0 --chat    # and chat with it in the foreground; the cluster stops after

Children run in their own process groups with one log file each under the run's log dir; Ctrl-C
or SIGTERM stops them in order (SIGTERM: each drains; SIGKILL after --stop-timeout), and the
kernel kills them if the launcher itself dies (PR_SET_PDEATHSIG). A worker or memserver that dies
while the cluster serves is replaced; a router that dies, or a crash loop, stops the cluster
(services.launch.supervisor).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from services.launch.cluster import ClusterError, LocalCluster
from services.launch.config import DTYPES, LaunchConfig
from services.worker.config import add_lora_arguments, lora_modules, served_names
from services.worker.engine.config import KV_CACHE_DTYPES
from services.launch.progress import Progress
from services.launch.supervisor import RestartBudget
from services.router.lora_api import runtime_updating_allowed
from services.router.reasoning import REASONING_PARSERS
from services.router.tool_parsers import TOOL_CALL_PARSERS, check_auto_tool_choice
from services.runtime.sizes import format_size, size_arg
from services.runtime.auth import API_KEY_ENV, CLUSTER_TOKEN_ENV, DEV_CLUSTER_TOKEN, resolve_api_keys
from services.runtime.tls import add_server_tls_arguments, server_tls_from_args

LOG_DIR_ENV = "KVMESH_LOG_DIR"


class StopRequested(BaseException):
    """SIGINT/SIGTERM while the cluster runs: unwinds to the stop path (BaseException, like KeyboardInterrupt)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' (embedded) or a local Hugging Face model directory")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) clients put in requests (default: --model); with several, any "
                             "works and responses name the first")
    parser.add_argument("--workers", type=int, default=1, help="number of workers (default 1)")
    parser.add_argument("--memservers", type=int, default=2, help="number of CPU memory servers (default 2)")
    parser.add_argument("--memserver-capacity", type=size_arg, default="512MiB", metavar="SIZE",
                        help="KV memory per memserver, e.g. 512MiB, 8GiB (default 512MiB)")
    parser.add_argument("--worker-kv-blocks", type=int, default=None, metavar="N",
                        help="cap on each worker's local KV blocks (default: what memory allows)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                        help="the workers' --max-model-len: longest prompt + output served (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                        help="the workers' --max-num-seqs: sequences a worker runs at once (default: theirs, 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="TOKENS",
                        help="the workers' --max-num-batched-tokens: tokens per engine step (default: theirs)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--port", type=int, default=8000, help="router port; 0 picks a free one (default 8000)")
    parser.add_argument("--worker-threads", type=int, default=None, metavar="N",
                        help="torch threads per worker (default: all cores but one, shared by the workers)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="workers reuse the KV of earlier prompts' full blocks (default: on)")
    parser.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                        help="the workers': fcfs, or priority (requests' priority field, lower first, as vLLM)")
    parser.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                        help="the workers': a Jinja chat template (a file, or the template itself) instead of "
                             "the model's own")
    parser.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                        help="the workers': where requests' unset sampling fields come from ('auto': the model's "
                             "generation_config.json, as vLLM; 'vllm': OpenAI's defaults)")
    add_lora_arguments(parser, whose="the workers': ")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="the workers' (and so the memory servers'): fp8 holds 2x (bf16) or 4x (fp32) the "
                             "tokens in the same memory, as vLLM's")
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help="the workers': vLLM's speculative decoding, e.g. '{\"method\": \"ngram\", "
                             "\"num_speculative_tokens\": 5, \"prompt_lookup_max\": 4}'")
    parser.add_argument("--responses-store-size", type=int, default=None, metavar="N",
                        help="the router's: how many /v1/responses it keeps for previous_response_id (default "
                             "1000; 0: none)")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="the router's: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (with "
                             "--enable-lora; also VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)")
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                        help="the router's: lets chat requests use tool_choice 'auto' (see kvmesh router --help)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="vLLM's flag, accepted so its command lines work (needs --tool-call-parser)")
    parser.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                        help="the router's: chat answers' <think> reasoning as reasoning_content")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="the router's: logprobs name tokens 'token_id:{id}' for every request (as vLLM's)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help=f"the router's --api-key: clients send 'Authorization: Bearer KEY' (repeatable; "
                             f"default: ${API_KEY_ENV}); --chat uses the first")
    add_server_tls_arguments(parser, whose="the router's: ")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help=f"per-run log dir (default ${LOG_DIR_ENV}/<timestamp>, else ./.kvmesh/logs/<timestamp>)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /ready")
    parser.add_argument("--stop-timeout", type=float, default=30.0,
                        help="seconds each process gets to drain after SIGTERM before SIGKILL")
    parser.add_argument("--chat", action="store_true",
                        help="run `kvmesh chat` against the cluster in the foreground; stop the cluster when it exits "
                             "(reads lines from stdin when it is not a terminal)")
    parser.add_argument("--chat-max-tokens", type=int, default=None, help="max_tokens per chat answer")


def default_log_dir() -> Path:
    base = Path(os.environ.get(LOG_DIR_ENV) or Path(".kvmesh") / "logs")
    return base / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    check_auto_tool_choice(args.enable_auto_tool_choice, args.tool_call_parser)
    return LaunchConfig(
        model=args.model, **served_names(args.served_model_name), num_workers=args.workers,
        num_memservers=args.memservers,
        memserver_capacity=args.memserver_capacity, worker_kv_blocks=args.worker_kv_blocks,
        block_size=args.block_size, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        worker_threads=args.worker_threads, port=args.port,
        enable_prefix_caching=args.enable_prefix_caching, generation_config=args.generation_config,
        chat_template=args.chat_template, scheduling_policy=args.scheduling_policy,
        speculative_config=args.speculative_config, kv_cache_dtype=args.kv_cache_dtype, enable_lora=args.enable_lora,
        lora_modules=lora_modules(args.enable_lora, args.lora_modules), max_lora_rank=args.max_lora_rank,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        allow_runtime_lora_updating=runtime_updating_allowed(args.allow_runtime_lora_updating),
        responses_store_size=args.responses_store_size, api_keys=resolve_api_keys(args.api_key),
        tls=server_tls_from_args(args), return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        log_dir=(args.log_dir or default_log_dir()).resolve(),
        cluster_token=os.environ.get(CLUSTER_TOKEN_ENV) or DEV_CLUSTER_TOKEN,
        ready_timeout_s=args.ready_timeout, stop_timeout_s=args.stop_timeout,
    )


def _raise_stop(signum, frame) -> None:
    raise StopRequested(signal.Signals(signum).name)


def summary(cluster: LocalCluster, elapsed_s: float) -> str:
    c = cluster.config
    chat_hint = f"kvmesh chat --url {cluster.url}" + (" --api-key KEY" if c.api_keys else "")
    if cluster.trust_file is not None:
        chat_hint += f" --ca-certs {cluster.trust_file}"
    lines = [f"kvmesh up: ready in {elapsed_s:.1f}s",
             f"  url        {cluster.url}/v1  (OpenAI-compatible; try: {chat_hint})"]
    if c.api_keys:
        lines.append(f"  api keys   {len(c.api_keys)}: clients send 'Authorization: Bearer KEY' "
                     "(an OpenAI client's api_key)")
    try:
        lines.append(f"  cluster    {cluster.view().describe()}")
    except RuntimeError as e:
        lines.append(f"  cluster    (view unavailable: {e})")
    if c.num_memservers:
        lines.append(f"  memservers {c.num_memservers} x {format_size(c.memserver_capacity_bytes)} (cpu)")
    procs = ", ".join(f"{ch.name} pid {ch.pid} :{ch.port}" for ch in cluster.children)
    lines.append(f"  processes  {procs}")
    lines.append(f"  logs       {cluster.log_dir}/ (one file per process; cluster.json lists them)")
    return "\n".join(lines)


def _run_chat(url: str, max_tokens: int | None, api_key: str | None, ca_certs: Path | None) -> int:
    from services import chat

    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    chat_args = parser.parse_args(["--url", url])
    chat_args.max_tokens = max_tokens
    chat_args.api_key = api_key
    chat_args.ca_certs = str(ca_certs) if ca_certs is not None else None
    # the chat's own Ctrl-C handling: stop the current answer; Ctrl-D, /exit (or end of stdin) quits
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return chat.main(chat_args)


def _tend(cluster: LocalCluster, budget: RestartBudget) -> bool:
    """Replace the workers and memservers that died; False when the cluster must stop instead."""
    try:
        replaced = cluster.replace_dead(budget)
    except ClusterError as e:
        print(f"kvmesh up: {e}", file=sys.stderr, flush=True)
        return False
    for dead, new in replaced:
        print(f"kvmesh up: {dead.name} exited with status {dead.popen.returncode} (log {dead.log_path}); "
              f"started {new.name} in its place", file=sys.stderr, flush=True)
    return True


def _watch(cluster: LocalCluster, budget: RestartBudget) -> int:
    """Until a signal (StopRequested), or until the cluster must stop (1)."""
    while _tend(cluster, budget):
        time.sleep(0.5)
    return 1


def _chat_tended(cluster: LocalCluster, budget: RestartBudget, max_tokens: int | None) -> int:
    """The chat in the foreground while a thread tends the cluster; 1 if it had to give up."""
    stop, gave_up = threading.Event(), threading.Event()

    def tend() -> None:
        while not stop.wait(0.5):
            if not _tend(cluster, budget):
                gave_up.set()
                return

    tender = threading.Thread(target=tend, name="kvmesh-up-tender", daemon=True)
    tender.start()
    try:
        rc = _run_chat(cluster.url, max_tokens, cluster.config.api_keys[0] if cluster.config.api_keys else None,
                       cluster.trust_file)
    finally:
        stop.set()
        tender.join()  # before the cluster stops: nothing is replaced while it stops
    return 1 if gave_up.is_set() else rc


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"kvmesh up: {e}", file=sys.stderr)
        return 2
    progress = Progress()
    cluster = LocalCluster(config, config.log_dir, progress)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    rc = 0
    try:
        progress.note(f"kvmesh up: starting {config.num_workers} worker(s), {config.num_memservers} memserver(s); "
                      f"logs in {config.log_dir}")
        start = time.monotonic()
        cluster.start()
        print(summary(cluster, time.monotonic() - start), flush=True)
        if args.chat:
            rc = _chat_tended(cluster, RestartBudget(), args.chat_max_tokens)
        else:
            print("  Ctrl-C stops the cluster.", flush=True)
            rc = _watch(cluster, RestartBudget())
    except StopRequested:
        pass
    except (ClusterError, TimeoutError) as e:
        print(f"kvmesh up: {e}", file=sys.stderr)
        rc = 1
    finally:
        _stop(cluster)
    return rc


def _stop(cluster: LocalCluster) -> None:
    def force(signum, frame) -> None:  # a second Ctrl-C: no more waiting
        cluster.kill_all()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, force)
    print("kvmesh up: stopping (workers drain first; Ctrl-C again to kill)", file=sys.stderr, flush=True)
    codes = cluster.stop()
    bad = {name: code for name, code in codes.items() if code != 0}
    print(f"kvmesh up: stopped {len(codes)} process(es)" + (f"; non-zero exits: {bad}" if bad else ""),
          file=sys.stderr, flush=True)
