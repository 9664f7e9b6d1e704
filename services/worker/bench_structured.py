"""What a structured output costs the engine: decode step time with and without a grammar.

    python -m services.worker.bench_structured [--model tiny] [--dtype bfloat16] [--rounds 3]

Batch 1 and 16, greedy, ignore_eos. The constrained runs use a regex that never completes within
max_tokens (every step masks), the free runs none; rounds alternate the two. Prints the p50 of
full-batch decode steps for each and the ratio (no target: vLLM pays the same kind of cost).
"""

from __future__ import annotations

import argparse
import statistics
import time

from services.worker.engine.api import GenerateRequest, SamplingParams, StructuredKind, StructuredOutput
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine

REGEX = "[a-z ]{2000}"  # longer than any run: the grammar masks every step


def decode_step_ms(engine: LLMEngine, batch: int, max_tokens: int, structured: StructuredOutput | None) -> float:
    """p50 of the steps in which every sequence of the batch decoded a token."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, structured=structured)
    start = time.perf_counter()
    for i in range(batch):
        engine.submit(engine.prepare(GenerateRequest(f"b{start}-{i}", params, prompt=f"Write a story {i}")))
    times = []
    while engine.has_work():
        t0 = time.perf_counter()
        num_tokens = sum(len(d.token_ids) for d in engine.step())
        if num_tokens == batch:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3 if times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype))
    grammar = StructuredOutput(StructuredKind.REGEX, REGEX)
    decode_step_ms(engine, 1, 4, grammar)  # loads xgrammar and warms both paths
    decode_step_ms(engine, 1, 4, None)
    print(f"model={args.model} dtype={args.dtype} regex={REGEX!r} max_tokens={args.max_tokens} rounds={args.rounds}")
    print(f"{'batch':>5} {'free step ms':>13} {'grammar step ms':>16} {'ratio':>6}")
    for batch in (int(b) for b in args.batches.split(",")):
        free, constrained = [], []
        for _ in range(args.rounds):
            free.append(decode_step_ms(engine, batch, args.max_tokens, None))
            constrained.append(decode_step_ms(engine, batch, args.max_tokens, grammar))
        a, b = statistics.median(free), statistics.median(constrained)
        print(f"{batch:>5} {a:>13.2f} {b:>16.2f} {b / a:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
