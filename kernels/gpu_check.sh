#!/usr/bin/env bash
# GPU check for the Triton kernels: native (not interpreted) tests (the kernels, fp8 KV caches
# included, and a CUDA memory server's pool), then the decode benchmark.
# Usage (repo root, on a CUDA machine): bash kernels/gpu_check.sh   Logs go to $OUT if set.
# Installs nothing: it reports what is missing and stops.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
LOG_DIR="${OUT:-/tmp/kvmesh_gpu_check}"
mkdir -p "$LOG_DIR"
export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset

if ! "$PY" -c 'import torch, triton, pytest; assert torch.cuda.is_available(), "torch sees no CUDA device"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())' \
    2>&1 | tee "$LOG_DIR/gpu_env.log"; then
    echo "gpu_check: missing torch with CUDA, triton or pytest (see gpu_env.log); pip install 'triton==3.7.1' pytest pytest-timeout pytest-asyncio" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv >>"$LOG_DIR/gpu_env.log" 2>&1 || true

status=0
targets=(tests/kernels)
# the memory server's pool tests import the transport (ucxx), which some GPU images lack
if "$PY" -c 'import transport' >/dev/null 2>&1; then
    targets+=(tests/memserver/test_pool.py)
else
    echo "gpu_check: no ucxx here: skipping tests/memserver/test_pool.py" | tee -a "$LOG_DIR/gpu_env.log"
fi
"$PY" -m pytest -c /dev/null --rootdir . -m gpu "${targets[@]}" -q -rs -p no:cacheprovider 2>&1 | tee "$LOG_DIR/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 300 "$PY" -m kernels.bench_gpu 2>&1 | tee "$LOG_DIR/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: exit $status (logs in $LOG_DIR)"
exit $status
