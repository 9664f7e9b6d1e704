"""`kvmesh memserver` refuses bad settings with a message that says what to change."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,message", [
    (["--capacity", "8GB!"], "invalid size '8GB!'"),
    (["--capacity", "0"], "must be greater than zero"),
    (["--device", "tpu"], "device must be cpu or cuda"),
    (["--router", "localhost:8000"], "router URL must be http"),
    (["--per-owner-cap", "0"], "per_owner_cap must be >= 1"),
    (["--num-threads", "0"], "--num-threads must be >= 1"),
])
def test_bad_settings_exit_2_with_a_clear_message(args, message):
    proc = subprocess.run([sys.executable, "-m", "services.cli", "memserver", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
