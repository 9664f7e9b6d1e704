"""CPU path benchmark: paged partial attention over P partitions + merge vs one SDPA over all KV.

Decode (one query), 8 query heads / 2 kv heads; the baseline is torch SDPA on the contiguous KV of
the same tokens, measured in the same run
(calls alternated, medians). python -m kernels.bench_cpu [--head-dim 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kernels import merge_states, paged_attention_partial

NUM_HEADS, NUM_KV_HEADS, BLOCK_SIZE = 8, 2, 16


def _time_pair(a, b, min_time: float = 0.5) -> tuple[float, float]:
    """Median seconds per call of a and of b, calls alternated so both see the same background load."""
    a(), b()
    times_a, times_b = [], []
    deadline = time.perf_counter() + min_time
    while len(times_a) < 7 or time.perf_counter() < deadline:
        for fn, times in ((a, times_a), (b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times_a)[len(times_a) // 2], sorted(times_b)[len(times_b) // 2]


def _case(num_tokens: int, num_parts: int, head_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    num_blocks = num_tokens // BLOCK_SIZE
    # A pool twice the needed size, blocks handed out in a shuffled order as an allocator would.
    k_cache = torch.randn(2 * num_blocks, BLOCK_SIZE, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(2 * num_blocks, BLOCK_SIZE, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    block_ids = torch.randperm(2 * num_blocks, generator=gen)[:num_blocks].to(torch.int32)
    q = torch.randn(1, NUM_HEADS, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    per_part = num_blocks // num_parts
    parts = []
    for i in range(num_parts):
        table = block_ids[i * per_part:(i + 1) * per_part].view(1, -1).contiguous()
        lens = torch.tensor([per_part * BLOCK_SIZE], dtype=torch.int32)
        parts.append((table, lens, i == num_parts - 1))
    scale = head_dim ** -0.5

    def paged():
        states = [paged_attention_partial(q, k_cache, v_cache, t, n, qsl, scale, c) for t, n, c in parts]
        return merge_states(states)

    # SDPA baseline: the same tokens, already contiguous: [1, Hkv, N, D]
    k_all = k_cache[block_ids.long()].flatten(0, 1).transpose(0, 1).unsqueeze(0).contiguous()
    v_all = v_cache[block_ids.long()].flatten(0, 1).transpose(0, 1).unsqueeze(0).contiguous()
    q4 = q.view(1, NUM_HEADS, 1, head_dim)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k_all, v_all, scale=scale, enable_gqa=True)

    out, _ = paged()
    expected = sdpa().view(1, NUM_HEADS, head_dim)
    err = (out.float() - expected.float()).abs().max().item()
    paged_s, sdpa_s = _time_pair(paged, sdpa)
    return paged_s, sdpa_s, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"threads={torch.get_num_threads()} heads={NUM_HEADS}/{NUM_KV_HEADS} d={args.head_dim} "
          f"{args.dtype} block_size={BLOCK_SIZE} (decode, 1 query)")
    print(f"{'tokens':>7} {'parts':>5} {'paged+merge us':>15} {'sdpa us':>9} {'ratio':>6} {'max err':>9}")
    for num_tokens in args.tokens:
        for num_parts in args.parts:
            paged_s, sdpa_s, err = _case(num_tokens, num_parts, args.head_dim, dtype)
            print(f"{num_tokens:>7} {num_parts:>5} {paged_s * 1e6:>15.1f} {sdpa_s * 1e6:>9.1f} "
                  f"{paged_s / sdpa_s:>6.2f} {err:>9.2e}")


if __name__ == "__main__":
    main()
