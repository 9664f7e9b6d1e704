"""`kvmesh router`: the OpenAI-compatible front door."""

from __future__ import annotations

import argparse
import sys

from services.router.app import create_app, drain
from services.router.config import RouterConfig
from services.router.cors import parse_origins
from services.router.lora_api import runtime_updating_allowed
from services.router.reasoning import REASONING_PARSERS
from services.router.tool_parsers import TOOL_CALL_PARSERS, check_auto_tool_choice
from services.runtime.auth import API_KEY_ENV, resolve_api_keys, resolve_cluster_token
from services.runtime.logging import configure_logging
from services.runtime.serve import run_service
from services.runtime.tls import add_server_tls_arguments, server_tls_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cluster-token", default=None,
                        help="shared secret for /internal/ endpoints (default: $KVMESH_CLUSTER_TOKEN, else a "
                             "loopback-only dev token)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help=f"clients of the OpenAI routes must send 'Authorization: Bearer KEY' (repeat for "
                             f"several keys; default: ${API_KEY_ENV}, comma-separated; none: the API is open)")
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0, help="seconds without heartbeat before "
                        "a worker leaves rotation")
    parser.add_argument("--max-inflight-requests", type=int, default=256, help="beyond it: 429 + Retry-After")
    parser.add_argument("--max-n", type=int, default=8, help="cap on n (sequences per request)")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="beyond it: 413")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                        help="find the tool calls a model chose to make in its text, so chat requests may use "
                             "tool_choice 'auto' (hermes: <tool_call>{json}</tool_call>, as Hermes 2 Pro, Qwen2.5 "
                             "and the embedded model write them; llama3_json: an answer of {json} calls separated "
                             "by ';', as Llama 3.1-3.3 write them; mistral: [TOOL_CALLS] then the calls, as "
                             "Mistral's models write them); without it 'auto' is refused")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="vLLM's flag, accepted so its command lines work: here --tool-call-parser alone "
                             "allows tool_choice 'auto'; this one needs it")
    parser.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                        help="return a chat answer's <think> reasoning as reasoning_content, apart from its content "
                             "(deepseek_r1: the answer starts inside <think>; qwen3: only if it opens one)")
    parser.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGINS",
                        help="CORS: origins whose browser pages may call the API (repeatable; a comma list or "
                             "vLLM's JSON list works too; default: any, as vLLM)")
    parser.add_argument("--responses-store-size", type=int, default=1000, metavar="N",
                        help="how many /v1/responses the router keeps (in memory, newest first) for "
                             "previous_response_id and GET /v1/responses/{id}; 0: none (store is then false)")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="serve vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (workers need "
                             "--enable-lora); also on with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, as vLLM")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="logprobs name tokens 'token_id:{id}' for every request (vLLM's flag; a request may "
                             "ask with return_tokens_as_token_ids): tokens whose text is not valid UTF-8 alone "
                             "stay identifiable")
    add_server_tls_arguments(parser)
    parser.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    check_auto_tool_choice(args.enable_auto_tool_choice, args.tool_call_parser)
    return RouterConfig(
        host=args.host, port=args.port, cluster_token=resolve_cluster_token(args.cluster_token, args.host),
        api_keys=resolve_api_keys(args.api_key),
        heartbeat_timeout_s=args.heartbeat_timeout, max_inflight_requests=args.max_inflight_requests,
        max_n=args.max_n, max_body_bytes=args.max_body_bytes, drain_timeout_s=args.drain_timeout,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        allowed_origins=parse_origins(args.allowed_origins),
        allow_runtime_lora_updating=runtime_updating_allowed(args.allow_runtime_lora_updating),
        responses_store_size=args.responses_store_size, tls=server_tls_from_args(args),
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
    )


def main(args: argparse.Namespace) -> int:
    log = configure_logging("router", args.log_level)
    try:
        config = config_from_args(args)
        ssl_context = config.tls.context() if config.tls is not None else None
    except ValueError as e:
        log.error("bad_config", error=str(e))
        return 2
    return run_service(create_app(config), config.host, config.port, drain=drain, ssl_context=ssl_context)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvmesh router")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
