"""`kvmesh generate`: offline generation in one process, tokens streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
import time
import uuid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="text to continue (or the user message with --chat)")
    parser.add_argument("--model", default="tiny", help="local Hugging Face directory, or 'tiny' (embedded)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=None, help="cap on KV cache blocks")


def main(args: argparse.Namespace) -> int:
    from services.worker.engine.api import EngineError, GenerateRequest, SamplingParams
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.llm_engine import LLMEngine
    from services.worker.model.errors import ModelError

    try:
        config = EngineConfig(model=args.model, dtype=args.dtype, block_size=args.block_size, num_kv_blocks=args.kv_blocks)
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        engine = LLMEngine(config)
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, ignore_eos=args.ignore_eos,
        )
        fields = {"messages": ({"role": "user", "content": args.prompt},)} if args.chat else {"prompt": args.prompt}
        engine.submit(engine.prepare(GenerateRequest(uuid.uuid4().hex, params, **fields)))
    except (ValueError, ModelError, EngineError) as e:
        print(f"kvmesh generate: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    first = None
    num_tokens = 0
    finish = None
    while engine.has_work():
        for delta in engine.step():
            first = first or time.perf_counter()
            num_tokens = delta.num_generated_tokens
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            finish = delta.finish_reason or finish
    end = time.perf_counter()
    rate = (num_tokens - 1) / (end - first) if first and num_tokens > 1 and end > first else 0.0
    print(
        f"\n[{num_tokens} tokens, finish={finish.value if finish else '?'}, "
        f"TTFT {1000 * ((first or end) - start):.0f} ms, {rate:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0
