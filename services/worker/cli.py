"""`kvmesh worker`: serve one engine and join a router."""

from __future__ import annotations

import argparse
import sys

from services.runtime.auth import resolve_cluster_token
from services.runtime.logging import configure_logging
from services.runtime.serve import run_service
from services.worker.app import create_app, drain
from services.worker.engine.client import EngineStartFailed
from services.worker.config import WorkerConfig, add_lora_arguments, lora_modules, served_names
from services.worker.engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, KV_CACHE_DTYPES, SCHEDULING_POLICIES
from services.worker.model.chat_template import load_chat_template


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' or a local Hugging Face model directory")
    parser.add_argument("--router", default="http://127.0.0.1:8000", help="router base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--kv-blocks", type=int, default=None, help="cap on the local KV pool (default: what "
                        "memory allows)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                        help="tokens per engine step (chunked-prefill budget): larger prefills prompts "
                        "faster, smaller keeps running streams' inter-token gaps short")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                        help="longest prompt + output served (default: the model's max_position_embeddings); "
                        "longer requests get 400 context_length_exceeded")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch intra-op threads (default: all usable cores but one)")
    parser.add_argument("--logits-threads", type=int, default=None,
                        help="torch threads for the lm_head, which ends each step while the spare core "
                        "is idle (default: all usable cores, and at least --num-threads)")
    parser.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                        help="where requests' unset temperature, top_p, top_k, min_p and repetition_penalty come from: 'auto' (default) the model's generation_config.json, as vLLM; 'vllm' none (OpenAI's defaults); or a directory holding a generation_config.json")
    parser.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                        help="a Jinja chat template (a file, or the template itself) used instead of the "
                        "model's own, as vLLM's")
    parser.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                        help="fcfs: requests in arrival order; priority: by each request's priority (lower "
                        "first; vLLM's), then arrival; preemption takes the least urgent first")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) clients use (default: --model); with several, any of them works and "
                        "responses name the first, as vLLM")
    add_lora_arguments(parser)
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="what the KV cache holds (here and on memory servers): auto, the model's dtype; fp8 "
                        "(= fp8_e4m3) or fp8_e5m2, 8-bit floats with scale 1 as vLLM's: 2x (bf16) or 4x (fp32) the "
                        "tokens in the same memory, for slightly different attention (CUDA: fp8_e4m3 needs "
                        "compute capability >= 8.9)")
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help="vLLM's: speculative decoding, e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 5, "
                        "\"prompt_lookup_max\": 4}': greedy requests check up to that many tokens proposed from "
                        "earlier n-grams of their context in each step (same output, fewer steps)")
    parser.add_argument("--advertise-url", default=None, help="URL the router dials (default http://host:port)")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--cluster-token", default=None,
                        help="shared secret (default: $KVMESH_CLUSTER_TOKEN, else a loopback-only dev token)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    parser.add_argument("--no-remote-kv", action="store_true",
                        help="never spill KV to memory servers (context bounded by the local pool)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV of earlier prompts' full blocks for prompts that start with the "
                        "same tokens (default: on)")
    parser.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model=args.model, router_url=args.router, host=args.host, port=args.port,
        cluster_token=resolve_cluster_token(args.cluster_token, args.host), advertise_url=args.advertise_url,
        worker_id=args.worker_id, dtype=args.dtype,
        **served_names(args.served_model_name),
        block_size=args.block_size, num_kv_blocks=args.kv_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_threads=args.num_threads, logits_threads=args.logits_threads, heartbeat_interval_s=args.heartbeat_interval,
        drain_timeout_s=args.drain_timeout, remote_kv=not args.no_remote_kv,
        enable_prefix_caching=args.enable_prefix_caching, generation_config=args.generation_config,
        chat_template=load_chat_template(args.chat_template) if args.chat_template is not None else None,
        scheduling_policy=args.scheduling_policy,
        enable_lora=args.enable_lora, lora_modules=lora_modules(args.enable_lora, args.lora_modules),
        max_lora_rank=args.max_lora_rank, speculative_config=args.speculative_config,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def main(args: argparse.Namespace) -> int:
    log = configure_logging("worker", args.log_level)
    try:
        config = config_from_args(args)
        config.engine_config()  # validate engine settings before loading anything
    except ValueError as e:
        log.error("bad_config", error=str(e))
        return 2
    try:
        return run_service(create_app(config), config.host, config.port, drain=drain)
    except EngineStartFailed as e:  # a bad model directory or adapter: one line saying which, not a traceback
        log.error("engine_start_failed", error=str(e))
        return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvmesh worker")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
