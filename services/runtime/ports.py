"""A free TCP port for a child process to listen on, chosen below the kernel's ephemeral range.

A port the kernel hands out for bind(0) comes from the same range it draws outgoing connections'
source ports from. Between choosing it and the child binding it (seconds, for a memory server that
waits for the model's KV geometry first), any outgoing connection on the host may take it, and the
child fails with "address already in use" (seen in CI: a memserver's own polls of the router). A
port below the range is only ever taken by an explicit bind.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # below: well-known and registered services' ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range when there is room below it."""
    low = _ephemeral_low()
    if low is not None and low - _LOWEST >= 1000:
        for port in random.sample(range(_LOWEST, low), 64):
            if _bindable(host, port):
                return port
    with socket.socket() as s:  # no room below the range (or not Linux): the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int | None:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
