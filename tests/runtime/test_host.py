"""Process settings of services sharing cores (memory servers, engines)."""

import subprocess
import sys

from services.runtime.host import default_num_threads

# Page faults of a memory server's decode attention over 6K tokens (the tiny model's blocks), once
# warm: its gather and kernel buffers are freed and allocated again every call.
_FAULTS = """
import resource, sys, torch
from services.runtime.host import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print(-1); sys.exit()
from services.memserver.messages import attend_layout
from services.memserver.pool import BlockPool, Geometry
torch.set_num_threads(1)
pool = BlockPool(Geometry(4, 2, 32, 16, "float32"), 400)
layout = attend_layout([pool.allocate("w", 384)], [6144], [1])
q = torch.randn(1, 8, 32)
for layer in range(40):
    pool.attention("w", layer % 4, q, *layout, 0.2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for layer in range(40):
    pool.attention("w", layer % 4, q, *layout, 0.2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    """Faults of 40 warm calls in a fresh process, with (keep) or without (default) the tuning."""
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


def test_default_threads_leave_a_core_but_never_drop_to_zero():
    assert default_num_threads() >= 1


def test_warm_attention_reuses_its_scratch_memory_without_page_faults():
    kept = _faults("keep")
    if kept == -1:
        return  # not glibc: nothing to tune
    assert kept < 40  # under one a call; glibc's defaults gave 75-480 a call (kernel versions differ)
