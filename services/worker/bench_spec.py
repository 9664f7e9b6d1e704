"""Speculative decoding (ngram) vs plain decoding, same engine settings, same prompts, same run.

    python -m services.worker.bench_spec [--rounds 3] [--batches 1,16] [--dtype bfloat16]

Greedy, 128 prompt + 128 output tokens, ignore_eos. Prints output tok/s of both, their ratio, the
acceptance rate (accepted / proposed), tokens per sequence-step, and how many sequences came out
token for token the same (all in float32; in bfloat16 a row computed in a wider pass may round
differently, and a near-tie then goes the other way). The embedded model's greedy text falls into
loops, which n-grams predict well: a workload-dependent best case.
"""

from __future__ import annotations

import argparse
import statistics
import time

from services.worker.bench_engine import prompts
from services.worker.engine.api import GenerateRequest, SamplingParams
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine

SPEC = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'


def run(engine: LLMEngine, batch_prompts, output_len: int) -> tuple[float, list[list[int]], int]:
    """(output tok/s, tokens per prompt, steps)."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i, ids in enumerate(batch_prompts):
        engine.submit(engine.prepare(GenerateRequest(f"b{start}-{i}", params, prompt_token_ids=tuple(ids))))
    outs: dict[str, list[int]] = {f"b{start}-{i}": [] for i in range(len(batch_prompts))}
    steps = 0
    while engine.has_work():
        steps += 1
        for d in engine.step():
            outs[d.request_id].extend(d.token_ids)
    elapsed = time.perf_counter() - start
    return sum(map(len, outs.values())) / elapsed, list(outs.values()), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--speculative-config", default=SPEC)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()

    plain = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, enable_prefix_caching=False))
    spec = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, enable_prefix_caching=False,
                                  speculative_config=args.speculative_config))
    vocab = plain.model_config.vocab_size
    print(f"model={args.model} dtype={args.dtype} {args.speculative_config}")
    print(f"{'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>6} {'accepted':>9} {'tok/seq-step':>13} "
          f"{'same tokens':>12}")
    for batch in (int(b) for b in args.batches.split(",")):
        warm = prompts(batch, args.prompt_len, vocab, seed=999)[:1]
        run(plain, warm, 8)
        run(spec, warm, 8)
        ratios, a, b = [], [], []
        before = (spec.spec_stats.num_proposed, spec.spec_stats.num_accepted)
        seq_steps = same = 0
        for r in range(args.rounds):  # alternated
            batch_prompts = prompts(batch, args.prompt_len, vocab, seed=r)
            tps_a, outs_a, _ = run(plain, batch_prompts, args.output_len)
            tps_b, outs_b, steps = run(spec, batch_prompts, args.output_len)
            same += sum(x == y for x, y in zip(outs_a, outs_b))
            a.append(tps_a)
            b.append(tps_b)
            ratios.append(tps_b / tps_a)
            seq_steps += steps * batch
        proposed = spec.spec_stats.num_proposed - before[0]
        accepted = spec.spec_stats.num_accepted - before[1]
        tokens = args.rounds * batch * args.output_len
        print(f"{batch:>5} {statistics.median(a):>12.1f} {statistics.median(b):>11.1f} "
              f"{statistics.median(ratios):>5.2f}x {accepted / max(proposed, 1):>8.0%} {tokens / seq_steps:>13.2f} "
              f"{same:>5}/{args.rounds * batch}")


if __name__ == "__main__":
    main()
