"""Process settings for services that share their host's cores (engines, memory servers)."""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def default_num_threads(num_workers: int = 1) -> int:
    """Torch intra-op threads: all usable cores but one (never zero), shared by the ``num_workers``
    engines of this host. The spare core runs the event loops that stream tokens (and, on a
    laptop-sized host, the router). An OpenMP team larger than the cores free at that moment stalls
    every parallel region until its last thread is scheduled. On 2 cores, 1 thread instead of 2
    served 1.3x the tokens/s at 16 concurrent streams and cut a single stream's inter-token latency
    by 20%."""
    return max(1, (len(os.sched_getaffinity(0)) - 1) // num_workers)


def default_attention_threads() -> int:
    """Torch threads for a memory server's attention: every usable core. It computes while the
    workers whose queries it answers wait for it, so the core a co-located worker steps on is idle
    then. Threads sleep between calls (OMP_WAIT_POLICY=PASSIVE, set by the memory server unless
    given): a team that spun would take that core from the worker's next layer. On 2 cores beside
    a worker (`python -m loadtest.bench_distattention longctx --local-blocks 128 --multiples 8`,
    a 16K context, 88% of it on the memory server), 2 threads instead of 1 gave 0.77-0.97x of
    all-local decode speed against 0.73-0.87x, 5 of 5 alternated pairs; at 4K contexts and with two
    memory servers answering each layer at once it changed nothing."""
    return max(1, len(os.sched_getaffinity(0)))


def default_logits_threads(num_threads: int, num_workers: int = 1) -> int:
    """Torch threads for the lm_head: every usable core, shared by the ``num_workers`` engines of
    this host, and never fewer than the ``num_threads`` the rest of the step runs on. It ends a step, when the spare core is usually idle: the loops that stream tokens
    handle the previous step's deltas at its start, and memory servers have answered the last
    layer. The tiny model's lm_head (32000 x 256, memory-bound) at batch 1 on 2 cores, cold: bf16
    1.6 -> 1.1 ms, fp32 2.8 -> 1.9 ms; served at 1 stream, bf16, +9% tokens/s (4 of 4 alternated
    pairs)."""
    return max(num_threads, len(os.sched_getaffinity(0)) // num_workers, 1)



def run_on_threads(num_threads: int, restore: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on ``num_threads`` torch threads, then ``restore`` them (nothing to switch when
    equal): an engine's lm_head on every core, a memory server's short calls on one."""
    if num_threads == restore:
        return fn(*args)
    import torch  # here: the launcher imports this module and never needs torch

    torch.set_num_threads(num_threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(restore)

def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """glibc malloc: serve buffers under ``mmap_threshold`` from the heap and keep up to
    ``trim_threshold`` of freed memory, so the MiB-sized scratch tensors of each layer's attention
    (gathered K/V) are reused instead of mapped, faulted in page by page and unmapped on every call
    (6K tokens: ~75 page faults a call, 5-15% of its time). False where mallopt is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
