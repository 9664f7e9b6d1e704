"""GPU benchmark: Triton paged decode attention vs torch SDPA on already-gathered (contiguous) KV.

Prints time per call, the ratio, and the Triton kernel's achieved memory bandwidth (K/V bytes read
per second) as a fraction of the device's peak. python -m kernels.bench_gpu [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kernels.triton_attention import paged_attention_partial_triton

# Peak HBM bandwidth in bytes/s, matched by substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
]


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def _bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def run_case(batch, context, num_heads, num_kv_heads, head_dim, block_size, dtype, kv_dtype=None):
    """kv_dtype: the cache's when not q's (an fp8 KV cache, read in q's dtype)."""
    dev = "cuda"
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq + 16
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=dev, dtype=dtype).to(kv_dtype or dtype)
    v_cache = torch.randn(shape, device=dev, dtype=dtype).to(kv_dtype or dtype)
    tables = torch.randperm(num_blocks, device=dev)[: batch * blocks_per_seq].view(batch, -1).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    q = torch.randn(batch, num_heads, head_dim, device=dev, dtype=dtype)
    scale = head_dim ** -0.5

    def paged():
        return paged_attention_partial_triton(q, k_cache, v_cache, tables, lens, qsl, scale,
                                              max_query_len=1, check_values=False)

    # SDPA baseline on contiguous KV in q's dtype: [B, Hkv, L, D]
    k_all = k_cache.to(dtype)[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v_all = v_cache.to(dtype)[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    q4 = q.unsqueeze(2)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k_all, v_all, scale=scale, enable_gqa=True)

    err = (paged()[0].float() - sdpa().squeeze(2).float()).abs().max().item()
    t_paged, t_sdpa = _bench_ms(paged), _bench_ms(sdpa)
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * k_cache.element_size()
    del k_cache, v_cache, k_all, v_all
    torch.cuda.empty_cache()
    return t_paged, t_sdpa, kv_bytes / (t_paged * 1e-3), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    print(f"device={name} peak={peak / 1e12 if peak else float('nan'):.2f} TB/s  torch={torch.__version__}")
    shapes = [(64, 4096), (16, 16384), (4, 65536), (128, 8192)]
    if args.quick:
        shapes = shapes[:2]
    configs = [(32, 8, 128, 16, torch.bfloat16, None), (32, 8, 128, 32, torch.float16, None),
               (8, 2, 64, 16, torch.bfloat16, None)]
    if torch.cuda.get_device_capability() >= (8, 9):  # fp8 (e4m3) KV, converted in the kernel
        configs.append((32, 8, 128, 16, torch.bfloat16, torch.float8_e4m3fn))
    print(f"{'batch':>5} {'ctx':>6} {'H/Hkv':>6} {'d':>4} {'bs':>3} {'dtype/kv':>12} {'triton ms':>9} "
          f"{'sdpa ms':>8} {'ratio':>6} {'TB/s':>6} {'of peak':>7} {'max err':>8}")
    for heads, kv_heads, head_dim, block_size, dtype, kv_dtype in configs:
        name = str(dtype).removeprefix("torch.") + ("/fp8" if kv_dtype is not None else "")
        for batch, context in shapes:
            t_p, t_s, bw, err = run_case(batch, context, heads, kv_heads, head_dim, block_size, dtype, kv_dtype)
            frac = f"{bw / peak:7.1%}" if peak else "    n/a"
            print(f"{batch:>5} {context:>6} {heads:>3}/{kv_heads:<2} {head_dim:>4} {block_size:>3} "
                  f"{name:>12} {t_p:>9.3f} {t_s:>8.3f} {t_p / t_s:>6.2f} "
                  f"{bw / 1e12:>6.2f} {frac} {err:>8.1e}", flush=True)


if __name__ == "__main__":
    main()
