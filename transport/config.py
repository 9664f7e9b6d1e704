"""UCX settings for kvmesh: one frozen dataclass, applied to the environment before ucxx loads.

UCX reads most of its settings from ``UCX_*`` environment variables when the context is created,
and ``import ucxx`` itself sets a few defaults, so :func:`apply_ucx_env` must run before the first
``import ucxx`` (``transport.node`` calls it; nothing else in kvmesh imports ucxx).

Defaults are for the loopback-only dev machines (``UCX_NET_DEVICES=lo``, tcp). On an RDMA host:

    TransportConfig(tls="rc,cuda_copy,cuda_ipc,tcp", net_devices="mlx5_0:1", rndv_scheme="auto")

``net_devices`` must name the HCA port (``ucx_info -d``); ``cuda_copy``/``cuda_ipc`` let UCX move
CUDA tensors directly (GPUDirect when the NIC supports it). Shared-memory lanes (posix/sysv/cma)
are not used: listener endpoints always run with error handling in ucxx 0.52, which rules them out,
and without error handling a dead peer hangs or aborts the survivor (see NOTES-ucx.md).

Progress: the worker runs in UCX *blocking* mode, driven by the asyncio loop (its epoll fd is a
loop reader), with a short busy-poll (``spin_us``) after each event, on both sides (a client after
sending, a server after a request and its reply): a round trip usually needs no epoll wake-up.
Idle cost is ~0 (epoll sleeps once the spin after the last event ran out). Callers that know a
message is due poll until it comes (``Node.linger``, ``Request.linger``): the worker's step thread
while a layer's partial attention is out, a memory server between one layer's answer and the next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TransportConfig:
    token: bytes = b""  # cluster token; peers prove they hold it (HMAC), it never crosses the wire
    tls: str = "tcp,self"  # UCX_TLS
    net_devices: str = "lo"  # UCX_NET_DEVICES
    rndv_scheme: str = "put_zcopy"  # UCX_RNDV_SCHEME: ~3x large-message throughput over tcp
    rndv_thresh: int = 8192  # UCX_RNDV_THRESH: frames above this go zero-copy (rendezvous)
    inline_bytes: int = 6144  # CPU frames up to this (in all, per message) travel in the header
    spin_us: int = 100  # busy-poll this long after the last activity, then sleep in epoll
    request_timeout_s: float = 30.0  # default deadline of one request (TransferTimeout)
    connect_timeout_s: float = 5.0  # connect + authenticate
    heartbeat_interval_s: float = 0.2  # ping a peer that has been silent this long while requests wait
    peer_timeout_s: float = 1.0  # a peer silent this long while requests wait is unreachable
    max_header_bytes: int = 1 << 20  # larger headers are refused
    max_frames: int = 4096  # frames per message (frame index is 12 bits of the UCX tag)
    frame_timeout_s: float = 10.0  # frames announced by a header must arrive within this

    def __post_init__(self) -> None:
        if not isinstance(self.token, bytes):
            raise ValueError("token must be bytes")
        if self.spin_us < 0:
            raise ValueError("spin_us must be >= 0")
        if not 0 <= self.inline_bytes < self.max_header_bytes // 2:
            raise ValueError("inline_bytes must be in 0..max_header_bytes/2")
        if not 0 < self.max_frames <= 4096:
            raise ValueError("max_frames must be in 1..4096")
        for name in ("request_timeout_s", "connect_timeout_s", "heartbeat_interval_s",
                     "peer_timeout_s", "frame_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.heartbeat_interval_s >= self.peer_timeout_s:
            raise ValueError("heartbeat_interval_s must be < peer_timeout_s")

    @classmethod
    def from_env(cls, **overrides) -> "TransportConfig":
        """Defaults, with the token from KVMESH_CLUSTER_TOKEN unless given."""
        if "token" not in overrides:
            overrides["token"] = os.environ.get("KVMESH_CLUSTER_TOKEN", "").encode()
        if "spin_us" not in overrides and "KVMESH_UCX_SPIN_US" in os.environ:
            overrides["spin_us"] = int(os.environ["KVMESH_UCX_SPIN_US"])
        return cls(**overrides)

    def ucx_options(self) -> dict[str, str]:
        """Options for the UCX context (they override UCX_* variables of the same name)."""
        return {
            "TLS": self.tls,
            "NET_DEVICES": self.net_devices,
            "RNDV_SCHEME": self.rndv_scheme,
            "RNDV_THRESH": str(self.rndv_thresh),
        }


def apply_ucx_env(config: TransportConfig) -> None:
    """Set UCX variables before ``import ucxx`` (which otherwise sets its own RNDV defaults)."""
    for key, value in config.ucx_options().items():
        os.environ.setdefault(f"UCX_{key}", value)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("UCX_MEMTYPE_CACHE", "n")
