"""Run `kvmesh up` as a real process for tests: wait for its cluster.json, read children's pids and
ports, and make sure nothing outlives the test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from services.runtime.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SMALL = ("--memservers", "0", "--worker-kv-blocks", "256", "--worker-threads", "1", "--stop-timeout", "20")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def port_free(port: int) -> bool:
    """Nothing listens and a server could bind it again (SO_REUSEADDR, as aiohttp sets: the closed
    connections' TIME_WAIT entries do not count)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_up(log_dir: Path, *args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--log-dir", str(log_dir), *args],
                            cwd=REPO, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_manifest(proc: subprocess.Popen, log_dir: Path, timeout: float = 240.0) -> dict:
    path = log_dir / "cluster.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"kvmesh up exited with {proc.returncode}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise TimeoutError("kvmesh up did not become ready")
        time.sleep(0.1)
    return json.loads(path.read_text())


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@contextlib.contextmanager
def cleanup(proc: subprocess.Popen, log_dir: Path):
    """On the way out, however the test went: the launcher and every child it recorded are dead."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
            proc.wait(30)
        path = log_dir / "cluster.json"
        if path.exists():
            for p in json.loads(path.read_text())["processes"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p["pid"], signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()
