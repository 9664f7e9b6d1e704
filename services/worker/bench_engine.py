"""Engine throughput vs transformers' generate on the same weights, in the same run.

    python -m services.worker.bench_engine [--model tiny] [--rounds 2]

Batch 1 and 16, 128 prompt + 128 output tokens, ignore_eos, greedy. Prints output tok/s for both
and the ratio (targets: >= 1x at batch 1, >= 3x at batch 16). Rounds alternate the two systems.
Each round's prompts are new: the engine's prefix cache never serves a round's prompts from the one
before (repeating them made every round after the first skip its prefill, ~20% of the run at
batch 16, which transformers pays every time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from services.worker.engine.api import GenerateRequest, SamplingParams
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.model.tiny import resolve_model_dir


def prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch * 1000 + seed)
    return torch.randint(10, vocab, (batch, prompt_len), generator=gen).tolist()


def bench_engine(engine: LLMEngine, batch_prompts, output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i, ids in enumerate(batch_prompts):
        engine.submit(engine.prepare(GenerateRequest(f"b{start}-{i}", params, prompt_token_ids=tuple(ids))))
    generated = 0
    while engine.has_work():
        generated += sum(len(d.token_ids) for d in engine.step())
    return generated / (time.perf_counter() - start)


def bench_transformers(model, batch_prompts, output_len: int) -> float:
    ids = torch.tensor(batch_prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return (out.shape[0] * (out.shape[1] - ids.shape[1])) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()

    import transformers

    model_dir = resolve_model_dir(args.model)
    dtype = getattr(torch, args.dtype)
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype=args.dtype))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    vocab = engine.model_config.vocab_size
    print(f"model={args.model} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"prompt={args.prompt_len} output={args.output_len}")
    print(f"{'batch':>5} {'kvmesh tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    for batch in (int(b) for b in args.batches.split(",")):
        bench_engine(engine, prompts(batch, args.prompt_len, vocab, seed=999)[:1], 8)  # warm-up
        ours, theirs = [], []
        for round_index in range(args.rounds):
            batch_prompts = prompts(batch, args.prompt_len, vocab, seed=round_index)
            ours.append(bench_engine(engine, batch_prompts, args.output_len))
            theirs.append(bench_transformers(hf, batch_prompts, args.output_len))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{batch:>5} {a:>13.1f} {b:>19.1f} {a / b:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
