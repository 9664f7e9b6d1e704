#!/usr/bin/env bash
# Creates (or reuses) ./.venv and installs kvmesh with its test extras. Idempotent.
# torch is pinned to 2.13.0: on the dev machines that is a CPU build from local disk; an unpinned
# torch would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.kvmesh-installed
want=$(cat pyproject.toml deploy/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "kvmesh: installing into .venv (first run takes a few minutes)" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check 'torch==2.13.0'
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
fi
