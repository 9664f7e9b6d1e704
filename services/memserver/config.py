"""The memory server's one config object."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemserverConfig:
    router_url: str
    cluster_token: str
    capacity_bytes: int
    device: str = "cpu"
    host: str = "127.0.0.1"  # the address workers dial (transport) and the HTTP health port binds
    port: int = 0  # transport port; 0: any free port
    http_port: int = 0  # /health and /internal/stats; 0: any free port (logged)
    memserver_id: str | None = None
    per_owner_cap: int | None = None  # max blocks one worker may hold here
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.capacity_bytes <= 0:
            raise ValueError(f"capacity must be positive, got {self.capacity_bytes} bytes")
        if not self.router_url.startswith(("http://", "https://")):
            raise ValueError(f"router URL must be http(s)://..., got {self.router_url!r}")
        if self.per_owner_cap is not None and self.per_owner_cap < 1:
            raise ValueError(f"per_owner_cap must be >= 1, got {self.per_owner_cap}")
        if self.heartbeat_interval_s <= 0 or self.drain_timeout_s <= 0:
            raise ValueError("heartbeat_interval_s and drain_timeout_s must be > 0")

    def id_for(self, transport_address: str) -> str:
        return self.memserver_id or f"ms-{socket.gethostname()}-{transport_address.rsplit(':', 1)[-1]}"
