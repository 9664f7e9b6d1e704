"""Transport benchmark: kvmesh-over-UCX vs plain asyncio+uvloop TCP vs numpy memcpy.

    python -m transport.bench [--quick]

Two processes: this one (client) and a server process (transport.testing_server for kvmesh, a
uvloop TCP echo server for the baseline). Throughput: one-way bytes per second of frames sent to
the server (the reply carries no payload), 2 requests in flight. Latency, sequential round trips:
64 B payload echoed back; header only; small frames, shaped like a remote-attention call (a 4 KiB
request frame, reply frames of 4 KiB and 256 B). Idle CPU: each process over 2 s with an open,
unused connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import time

import numpy as np
import torch
import uvloop

from transport.config import TransportConfig
from transport.node import Node
from transport.wire import Echo

SIZES = [256 << 10, 4 << 20, 64 << 20]
SMALL_REQUEST, SMALL_REPLY = 4096, (4096, 256)  # q frame -> out + lse frames
TOKEN = "bench-token"


def _proc_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _idle_cpu(pid: int, seconds: float = 2.0) -> tuple[float, float]:
    """(client %, server %) of one core while idle."""
    c0, s0, t0 = time.process_time(), _proc_cpu_s(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    dt = time.perf_counter() - t0
    return (time.process_time() - c0) / dt * 100, (_proc_cpu_s(pid) - s0) / dt * 100


def _bytes_for(total: int) -> int:
    return max(4, min(200, (1 << 30) // total))


def _start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, KVMESH_CLUSTER_TOKEN=TOKEN)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    for line in proc.stdout:
        if line.startswith(b"READY "):
            return proc, line.split()[1].decode()
    raise RuntimeError(f"{cmd} did not start")


def _stop(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(10)


async def _throughput(send_one, size: int, quick: bool) -> float:
    n = _bytes_for(size) // (4 if quick else 1)
    n = max(n, 4)
    for _ in range(2):
        await send_one()
    sem = asyncio.Semaphore(2)

    async def one():
        async with sem:
            await send_one()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n * size / (time.perf_counter() - t0) / 1e9


async def _latency(call, n: int) -> tuple[float, float]:
    for _ in range(200):
        await call()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


async def bench_kvmesh(quick: bool) -> dict:
    proc, address = _start([sys.executable, "-m", "transport.testing_server"])
    node = await Node.start(TransportConfig.from_env(token=TOKEN.encode()))
    try:
        conn = await node.connect(address)
        out = {}
        for size in SIZES:
            frame = torch.ones(size, dtype=torch.uint8)
            out[size] = await _throughput(lambda: conn.request(Echo(send_back=False), [frame]),
                                          size, quick)
        payload, dest = torch.ones(64, dtype=torch.uint8), torch.empty(64, dtype=torch.uint8)
        n = 1000 if quick else 5000
        out["lat"] = await _latency(lambda: conn.request(Echo(), [payload], into=[dest]), n)
        out["lat_header"] = await _latency(lambda: conn.request(Echo(note="x" * 64)), n)
        q = torch.ones(SMALL_REQUEST, dtype=torch.uint8)
        outs = [torch.empty(size, dtype=torch.uint8) for size in SMALL_REPLY]
        out["lat_small"] = await _latency(
            lambda: conn.request(Echo(reply_sizes=SMALL_REPLY), [q], into=outs), n)
        out["idle"] = await _idle_cpu(proc.pid)
        await conn.close()
    finally:
        await node.close()
        _stop(proc)
    return out


# -- plain asyncio + uvloop TCP baseline ------------------------------------------------------


async def _tcp_serve() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n, reply_n) = struct.unpack("!QQ", await reader.readexactly(16))
                data = await reader.readexactly(n)
                reply = data if reply_n == n else bytes(reply_n)
                writer.write(struct.pack("!Q", reply_n) + reply)
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 26)
    print(f"READY 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    loop.add_reader(0, lambda: stop.set() if not os.read(0, 4096) else None)
    await stop.wait()


async def bench_tcp(quick: bool) -> dict:
    proc, address = _start([sys.executable, "-m", "transport.bench", "--serve-tcp"])
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 26)
    lock = asyncio.Lock()

    async def call(data: bytes, echo: bool, reply_n: int | None = None) -> bytes:
        async with lock:  # one request on the wire at a time per direction
            reply_n = (len(data) if echo else 0) if reply_n is None else reply_n
            writer.write(struct.pack("!QQ", len(data), reply_n))
            writer.write(data)
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
            return await reader.readexactly(n) if n else b""

    out = {}
    for size in SIZES:
        data = bytes(size)
        out[size] = await _throughput(lambda: call(data, False), size, quick)
    n = 1000 if quick else 5000
    out["lat"] = await _latency(lambda: call(b"x" * 64, True), n)
    small = bytes(SMALL_REQUEST)
    out["lat_small"] = await _latency(lambda: call(small, False, sum(SMALL_REPLY)), n)
    out["idle"] = await _idle_cpu(proc.pid)
    writer.close()
    await writer.wait_closed()
    _stop(proc)
    return out


def bench_memcpy() -> dict:
    out = {}
    for size in SIZES:
        src, dst = np.ones(size, np.uint8), np.empty(size, np.uint8)
        n = _bytes_for(size)
        np.copyto(dst, src)
        t0 = time.perf_counter()
        for _ in range(n):
            np.copyto(dst, src)
        out[size] = n * size / (time.perf_counter() - t0) / 1e9
    return out


def _table(kv: dict, tcp: dict, mem: dict) -> str:
    rows = ["| metric | kvmesh (UCX) | asyncio+uvloop TCP | numpy memcpy | kvmesh / TCP |",
            "|---|---|---|---|---|"]
    for size in SIZES:
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        rows.append(f"| throughput {label} (GB/s) | {kv[size]:.2f} | {tcp[size]:.2f} | "
                    f"{mem[size]:.2f} | {kv[size] / tcp[size]:.2f}x |")
    rows.append(f"| 64 B RPC p50 / p99 (us) | {kv['lat'][0]:.0f} / {kv['lat'][1]:.0f} | "
                f"{tcp['lat'][0]:.0f} / {tcp['lat'][1]:.0f} | - | {kv['lat'][0] / tcp['lat'][0]:.2f}x |")
    rows.append(f"| 64 B header-only RPC p50 / p99 (us) | {kv['lat_header'][0]:.0f} / "
                f"{kv['lat_header'][1]:.0f} | - | - | - |")
    rows.append(f"| small-frame RPC 4 KiB -> 4 KiB + 256 B p50 / p99 (us) | "
                f"{kv['lat_small'][0]:.0f} / {kv['lat_small'][1]:.0f} | "
                f"{tcp['lat_small'][0]:.0f} / {tcp['lat_small'][1]:.0f} | - | "
                f"{kv['lat_small'][0] / tcp['lat_small'][0]:.2f}x |")
    rows.append(f"| idle CPU client / server (% of a core) | {kv['idle'][0]:.1f} / {kv['idle'][1]:.1f} | "
                f"{tcp['idle'][0]:.1f} / {tcp['idle'][1]:.1f} | - | - |")
    return "\n".join(rows)


async def _main(quick: bool) -> None:
    kv = await bench_kvmesh(quick)
    tcp = await bench_tcp(quick)
    print(_table(kv, tcp, bench_memcpy()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--serve-tcp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_tcp:
        uvloop.run(_tcp_serve())
    else:
        import structlog
        import logging

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        uvloop.run(_main(args.quick))


if __name__ == "__main__":
    main()
