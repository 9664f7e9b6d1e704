"""Child processes of `kvmesh up`: one log file each, their own process group, and killed by the
kernel if the launcher dies (PR_SET_PDEATHSIG), so a crashed launcher leaves no orphans."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _child_setup(launcher_pid: int) -> None:
    """Runs in the child between fork and exec."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass  # not Linux: the launcher's own stop path still applies
    if os.getppid() != launcher_pid:  # launcher died before prctl took effect
        os._exit(1)


@dataclass
class Child:
    name: str
    kind: str  # router | worker | memserver
    popen: subprocess.Popen
    log_path: Path
    port: int
    url: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        """To the whole process group: a child's own helpers go with it."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def kvmesh_argv(*cli_args: str) -> list[str]:
    """`kvmesh <cli_args>` with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "services.cli", *cli_args]


def spawn(name: str, kind: str, argv: list[str], log_dir: Path, port: int, host: str,
          env: dict[str, str], scheme: str = "http") -> Child:
    """`argv` in a new session, stdout+stderr to log_dir/<name>.log, killed if we die."""
    log_path = log_dir / f"{name}.log"
    launcher_pid = os.getpid()
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        popen = subprocess.Popen(
            argv, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only; it stops children in order
            preexec_fn=lambda: _child_setup(launcher_pid),
        )
    return Child(name, kind, popen, log_path, port, f"{scheme}://{host}:{port}")


def stop_children(children: list[Child], timeout_s: float) -> dict[str, int]:
    """SIGTERM all (each drains), SIGKILL those still alive at the deadline; name -> exit status."""
    for child in children:
        if child.alive:
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)
            child.popen.wait(10)
    for child in children:  # stragglers in a child's group whose leader already exited
        child.signal_group(signal.SIGKILL)
    return {c.name: c.popen.returncode for c in children}
