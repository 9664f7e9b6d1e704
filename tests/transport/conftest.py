"""Fixtures: echo-server processes on loopback and a transport node per test (per event loop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from transport.config import TransportConfig
from transport.node import Node

TOKEN = "conformance-token"


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    address: str

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server exits when stdin closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        elif self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.stdout.close()


def start_server(token: str = TOKEN) -> ServerProcess:
    env = dict(os.environ, KVMESH_CLUSTER_TOKEN=token)
    proc = subprocess.Popen([sys.executable, "-m", "transport.testing_server"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=None if os.environ.get("KVMESH_TEST_SERVER_LOGS") else subprocess.DEVNULL)
    for line in proc.stdout:  # UCX may print its own lines on stdout first
        if line.startswith(b"READY "):
            return ServerProcess(proc, line.split()[1].decode())
    proc.kill()
    proc.wait(10)
    raise RuntimeError("echo server did not start")


@pytest.fixture(scope="module")
def echo_server():
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def fresh_server():
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
async def node():
    n = await Node.start(TransportConfig(token=TOKEN.encode()))
    yield n
    await n.close()
