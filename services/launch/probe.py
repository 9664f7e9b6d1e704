"""Blocking HTTP probes of a running cluster (stdlib only: usable from the launcher, scenario
scripts and tests; async callers wrap them in asyncio.to_thread)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from services.launch.view import ClusterView, view_from_cluster_json, view_from_worker_stats
from services.runtime.auth import CLUSTER_TOKEN_HEADER


def get_json(url: str, token: str | None = None, timeout: float = 5.0, method: str = "GET") -> tuple[int, dict | None]:
    """(HTTP status, JSON body or None); status 0 when unreachable."""
    headers = {CLUSTER_TOKEN_HEADER: token} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def port_is_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def num_live_workers(router_url: str) -> int:
    _, body = get_json(router_url + "/ready")
    return int(body.get("num_live_workers", 0)) if body else 0


def worker_urls(router_url: str, token: str) -> list[str]:
    status, body = get_json(router_url + "/internal/workers", token)
    if status != 200 or body is None:
        raise RuntimeError(f"GET {router_url}/internal/workers: HTTP {status} (is the cluster token right?)")
    return [w["url"] for w in body["workers"]]


def cluster_view(router_url: str, token: str, workers: list[str] | None = None) -> ClusterView:
    """/cluster when the router has it, else the workers' stats (listed by the router unless given)."""
    status, body = get_json(router_url + "/cluster", token)
    if status == 200 and isinstance(body, dict):
        return view_from_cluster_json(body)
    stats = []
    for url in worker_urls(router_url, token) if workers is None else workers:
        status, body = get_json(url + "/internal/stats", token)
        if status != 200 or body is None:
            raise RuntimeError(f"GET {url}/internal/stats: HTTP {status}")
        stats.append(body)
    return view_from_worker_stats(stats)


def reset_prefix_cache(worker_url: str, token: str) -> tuple[int, dict | None]:
    """The worker forgets the prefixes it caches (on memory servers they hold blocks, freed before
    it answers)."""
    return get_json(worker_url + "/internal/reset_prefix_cache", token, timeout=30.0, method="POST")


def reset_prefix_caches(router_url: str, token: str) -> None:
    """Every worker the router lists: reset_prefix_cache (best effort: one may be gone)."""
    for url in worker_urls(router_url, token):
        reset_prefix_cache(url, token)


def wait_zero_used_blocks(router_url: str, token: str, timeout_s: float = 10.0) -> ClusterView:
    """Poll until no KV block is in use (blocks are freed just after a stream ends; cached prefixes
    are forgotten first, see reset_prefix_caches); the last view."""
    reset_prefix_caches(router_url, token)
    deadline = time.monotonic() + timeout_s
    while True:
        view = cluster_view(router_url, token)
        if view.num_used_blocks == 0 or time.monotonic() > deadline:
            return view
        time.sleep(0.2)
