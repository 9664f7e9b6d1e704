"""Worker drain on SIGTERM and worker death (kill -9) mid-stream, with real processes."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.e2e.cluster import (
    cluster_view, get, router_workers, running_cluster, wait_for, wait_zero_used_blocks, wait_zero_used_blocks_async,
)

BODY = {"model": "tiny", "prompt": "Stream for a while", "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("lifecycle"), num_workers=0) as c:
        yield c


async def _events(resp: aiohttp.ClientResponse) -> list:
    out = []
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_sigterm_drains_in_flight_then_exits_zero(cluster):
    worker = cluster.add_worker("--kv-blocks", "256", "--drain-timeout", "60")
    cluster.wait_ready(1)
    async with aiohttp.ClientSession() as session:
        async with session.post(cluster.router.url + "/v1/completions", json={**BODY, "max_tokens": 60}) as resp:
            assert resp.status == 200
            await resp.content.readline()
            worker.popen.terminate()  # SIGTERM mid-stream: the request must still complete
            events = await _events(resp)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    assert worker.popen.wait(60) == 0
    log = worker.log_text()
    assert "event='worker_drained'" in log and "num_completed=1" in log and "num_aborted=0" in log
    wait_for(lambda: router_workers(cluster.router) == [], 5, "the worker to leave the registry")
    async with aiohttp.ClientSession() as session:
        async with session.post(cluster.router.url + "/v1/completions", json={**BODY, "stream": False}) as resp:
            assert resp.status == 503
            assert "no worker available" in (await resp.json())["error"]["message"]


async def test_worker_killed_mid_stream_gives_sse_error_and_leaves_rotation(cluster):
    survivor = cluster.add_worker("--kv-blocks", "256")
    victim = cluster.add_worker("--kv-blocks", "256")
    cluster.wait_ready(2)
    async with aiohttp.ClientSession() as session:
        # two long streams: least-outstanding-tokens routing puts one on each worker
        streams = [await session.post(cluster.router.url + "/v1/completions", json={**BODY, "max_tokens": 3000})
                   for _ in range(2)]
        for s in streams:
            await s.content.readline()
        victim_id = victim.url.removeprefix("http://")
        await asyncio.to_thread(wait_for, lambda: _reported_used(cluster, victim_id) > 0, 10,
                                "the victim to report its blocks in use")
        victim.kill()  # SIGKILL
        readers = [asyncio.create_task(_events(s)) for s in streams]
        done, pending = await asyncio.wait(readers, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:  # the survivor's stream: not needed to the end
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            s.close()
    (finished,) = done
    events = finished.result()
    assert "error" in events[-1] and events[-1]["error"]["code"] == "worker_lost", events[-1]
    assert "[DONE]" not in events
    live = {w["worker_id"]: w["live"] for w in router_workers(cluster.router)}
    assert live[victim_id] is False and live[survivor.url.removeprefix("http://")] is True
    assert json.loads(get(cluster.router.url + "/ready")[1])["num_live_workers"] == 1
    await wait_zero_used_blocks_async([survivor])
    async with aiohttp.ClientSession() as session:  # the survivor still serves
        async with session.post(cluster.router.url + "/v1/completions", json={**BODY, "max_tokens": 3, "stream": False}) as resp:
            assert resp.status == 200
    wait_zero_used_blocks(cluster.workers)
    # The victim's blocks went with it: once it misses the heartbeat timeout the router's count,
    # which still lists its last report, leaves them out.
    wait_for(lambda: cluster_view(cluster.router)["num_used_blocks"] == 0, 10, "the router to stop counting the dead "
             "worker's blocks")
    (dead,) = [w for w in cluster_view(cluster.router)["workers"] if w["worker_id"] == victim_id]
    assert dead["silent"] and dead["num_used_blocks"] > 0


def _reported_used(cluster, worker_id: str) -> int:
    return next(w["num_used_blocks"] for w in cluster_view(cluster.router)["workers"] if w["worker_id"] == worker_id)
