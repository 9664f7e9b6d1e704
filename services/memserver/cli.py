"""`kvmesh memserver`: a KV memory server that joins a running cluster."""

from __future__ import annotations

import argparse
import os
import sys

from services.runtime.auth import resolve_cluster_token
from services.runtime.logging import configure_logging
from services.runtime.sizes import parse_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default="http://127.0.0.1:8000", help="router base URL")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the block pool lives")
    parser.add_argument("--capacity", default="1GiB", help="block pool size, e.g. 512MiB, 8GiB")
    parser.add_argument("--host", default="127.0.0.1", help="address workers dial")
    parser.add_argument("--port", type=int, default=0, help="transport (UCX) port; 0: any free port")
    parser.add_argument("--http-port", type=int, default=0, help="/health and stats port; 0: any free port")
    parser.add_argument("--memserver-id", default=None)
    parser.add_argument("--per-owner-cap", type=int, default=None, help="max blocks one worker may hold here")
    parser.add_argument("--cluster-token", default=None,
                        help="shared secret (default: $KVMESH_CLUSTER_TOKEN, else a loopback-only dev token)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds owners get to move their blocks off on SIGTERM")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch intra-op threads for attention (default: every usable core)")
    parser.add_argument("--log-level", default="info")


def main(args: argparse.Namespace) -> int:
    log = configure_logging("memserver", args.log_level)
    try:
        from services.memserver.config import MemserverConfig

        config = MemserverConfig(
            router_url=args.router, cluster_token=resolve_cluster_token(args.cluster_token, args.host),
            capacity_bytes=parse_size(args.capacity), device=args.device, host=args.host, port=args.port,
            http_port=args.http_port, memserver_id=args.memserver_id, per_owner_cap=args.per_owner_cap,
            heartbeat_interval_s=args.heartbeat_interval, drain_timeout_s=args.drain_timeout,
        )
    except ValueError as e:
        log.error("bad_config", error=str(e))
        print(f"kvmesh memserver: {e}", file=sys.stderr)
        return 2
    if args.num_threads is not None and args.num_threads < 1:
        print(f"kvmesh memserver: --num-threads must be >= 1, got {args.num_threads}", file=sys.stderr)
        return 2
    # Before torch loads OpenMP: its threads sleep between attention calls instead of spinning on
    # cores that co-located workers step on (kvmesh up sets the same for every process).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from services.runtime.host import default_attention_threads, keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.num_threads or default_attention_threads())
    from services.memserver.app import create_app, drain
    from services.runtime.serve import run_service

    return run_service(create_app(config), config.host, config.http_port, drain=drain)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvmesh memserver")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
