"""Memory servers coming and going: loss mid-stream, runtime join, two owners, worker death."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time

import aiohttp
import pytest

from services.memserver.messages import Attend, FreeBlocks, StoreBlocks, attend_layout
from tests.e2e.cluster import TOKEN, cluster_view, get, num_live_workers, running_cluster, wait_for, worker_stats
from tests.e2e.test_memservers import MEMSERVER_CAPACITY, WORKER_ARGS, _prompt, offline_texts, stream_text


async def _streams_around(cluster, prompts: list[list[int]], max_tokens: int, min_deltas: int, act) -> list[str]:
    """Stream every prompt; once `min_deltas` deltas arrived, call act(busiest memserver) mid-stream;
    return the texts."""
    deltas = 0

    def count():
        nonlocal deltas
        deltas += 1

    async with aiohttp.ClientSession() as session:
        streams = [asyncio.create_task(stream_text(session, cluster.router.url, p, max_tokens, count)) for p in prompts]
        await asyncio.to_thread(wait_for, lambda: deltas >= min_deltas, 120, "streams to start")
        used = {m.name: worker_stats(m)["num_used_blocks"] for m in cluster.memservers}
        busiest = next(m for m in cluster.memservers if m.name == max(used, key=used.get))
        assert used[busiest.name] > 0, used
        act(busiest)
        results = await asyncio.gather(*streams)
    return [t for t, _ in results]


def _memserver_ids(cluster) -> list[str]:
    return [m["memserver_id"] for m in cluster_view(cluster.router)["memservers"]]


async def test_memserver_killed_mid_stream_streams_complete_identically(tmp_path):
    prompts = [_prompt(900 + 100 * i, seed=30 + i) for i in range(3)]
    expected = await asyncio.to_thread(offline_texts, prompts, 40)
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=2,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        victims = []
        texts = await _streams_around(cluster, prompts, 40, 6, lambda m: (victims.append(m), m.kill()))  # SIGKILL
        assert texts == expected
        wait_for(lambda: _memserver_ids(cluster) and victims[0].name not in _memserver_ids(cluster),
                 15, "the router to drop the dead memserver")
        cluster.wait_zero_used_blocks()


async def test_a_memserver_frozen_mid_stream_is_lost_like_a_dead_one(tmp_path):
    """SIGSTOP (a hung host, a stalled network) past the transport's peer timeout: the streams
    complete identically (recomputed elsewhere), and once it answers again nothing stays held."""
    prompts = [_prompt(900 + 100 * i, seed=70 + i) for i in range(3)]
    expected = await asyncio.to_thread(offline_texts, prompts, 40)
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=2,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        frozen = []
        try:
            texts = await _streams_around(cluster, prompts, 40, 6,
                                          lambda m: (frozen.append(m), m.popen.send_signal(signal.SIGSTOP)))
            assert texts == expected
        finally:
            for m in frozen:
                m.popen.send_signal(signal.SIGCONT)
        wait_for(lambda: frozen[0].name in _memserver_ids(cluster), 30, "the thawed memserver to be listed again")
        cluster.wait_zero_used_blocks(timeout=15)


async def test_blocks_written_off_on_a_frozen_memserver_are_freed_once_it_answers(tmp_path):
    """The worker gives a silent memserver up (its sequence fails: no room left elsewhere) while
    the server still holds the blocks. When it answers again, the worker's write-off (a newer
    epoch) frees them; before, they stayed held for a live owner for good."""
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=1,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        memserver = cluster.memservers[0]
        body = {"model": "tiny", "prompt": _prompt(1500, seed=80), "max_tokens": 2000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(cluster.router.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    await asyncio.to_thread(wait_for, lambda: worker_stats(memserver)["num_used_blocks"] > 0, 120,
                                            "blocks to spill")
                    memserver.popen.send_signal(signal.SIGSTOP)
                    events = await resp.read()
            assert b"the cluster lost KV capacity" in events  # 32 local blocks cannot hold 1500 tokens
            await asyncio.sleep(5)  # the worker's write-offs fail meanwhile; its connections give up
        finally:
            memserver.popen.send_signal(signal.SIGCONT)
        wait_for(lambda: worker_stats(memserver)["num_used_blocks"] == 0, 20,
                 "the thawed memserver to free the written-off blocks")
        cluster.wait_zero_used_blocks()


async def test_too_long_request_succeeds_after_a_memserver_joins(tmp_path):
    prompt = _prompt(1200, seed=5)  # 76 blocks: more than 32 local + 24 remote
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=1, memserver_capacity="768KiB") as cluster:
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            async with session.post(cluster.router.url + "/v1/completions", json=body) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400 and error["code"] == "context_length_exceeded", error
                assert "1208" in error["message"]  # the numbers are named
            before = cluster_view(cluster.router)["max_context_tokens"]
            cluster.add_memserver(capacity=MEMSERVER_CAPACITY)
            cluster.wait_memservers(2)
            assert cluster_view(cluster.router)["max_context_tokens"] > before
            await asyncio.sleep(1.5)  # the worker learns the new capacity with its next heartbeat
            (expected,) = await asyncio.to_thread(offline_texts, [prompt], 8)
            text, _ = await stream_text(session, cluster.router.url, prompt, 8)
            assert text == expected
        cluster.wait_zero_used_blocks()


async def test_two_workers_share_memservers_and_owners_stay_apart(tmp_path):
    prompts = [_prompt(1000, seed=40), _prompt(1100, seed=41)]
    expected = await asyncio.to_thread(offline_texts, prompts, 16)
    with running_cluster(tmp_path, 2, worker_args=WORKER_ARGS, num_memservers=2,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        seen_owners: set[tuple[str, str]] = set()

        async def watch(stop: asyncio.Event):
            while not stop.is_set():
                view = await asyncio.to_thread(cluster_view, cluster.router)
                seen_owners.update((e["worker_id"], e["memserver_id"]) for e in view["lent"])
                await asyncio.sleep(0.2)

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(stream_text(session, cluster.router.url, p, 16) for p in prompts))
        stop.set()
        await watcher
        assert [t for t, _ in results] == expected
        assert len({w for w, _ in seen_owners}) == 2, seen_owners  # both workers borrowed
        cluster.wait_zero_used_blocks()


@contextlib.contextmanager
def _two_models_one_memserver(tmp_path, capacity: str):
    """Workers serving the same weights as models "a" and "b" (kept apart), one memory server;
    yields (cluster, worker a, worker b, answer(model, prompt) -> greedy text of 8 tokens)."""
    import openai

    with running_cluster(tmp_path, 0) as cluster:
        a = cluster.add_worker(*WORKER_ARGS, "--served-model-name", "a")
        b = cluster.add_worker(*WORKER_ARGS, "--served-model-name", "b")
        cluster.wait_ready(2)
        cluster.add_memserver(capacity=capacity)
        cluster.wait_memservers(1)
        with openai.OpenAI(base_url=cluster.router.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            def answer(model: str, prompt: list[int]) -> str:
                return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text

            yield cluster, a, b, answer
        cluster.wait_zero_used_blocks()


def test_a_workers_cached_prefix_makes_room_for_another_workers_request(tmp_path):
    doc, other = _prompt(2048, seed=70), _prompt(2048, seed=71)
    expected = offline_texts([doc, other], 8)
    with _two_models_one_memserver(tmp_path, "4MiB") as (cluster, a, b, answer):  # 128 blocks; each prompt ~97
        assert answer("a", doc) == expected[0]
        cached = worker_stats(a)["num_remote_cached_blocks"]
        assert cached >= 2048 // 16 - 32  # A keeps the document there
        # The router hears of it with A's next heartbeat, and counts it as room.
        wait_for(lambda: cluster_view(cluster.router)["free_context_tokens"] == (32 + 128) * 16, 10,
                 "the router to count A's cached blocks as room")
        metric = f'kvmesh_worker_kv_blocks_remote_cached{{worker="{worker_stats(a)["worker_id"]}"}} {cached}.0'
        assert metric in get(cluster.router.url + "/metrics")[1].decode()
        # B's request fits only in the room A's cache holds: admitted, and A gives the room up.
        assert answer("b", other) == expected[1]
        assert worker_stats(a)["num_remote_cached_blocks"] < cached
        assert "spill_failed" in b.log_text() or worker_stats(b)["num_remote_cached_blocks"] > 0


def test_an_idle_workers_cache_that_fills_the_memserver_gives_way(tmp_path):
    """A's cached document takes every block of the memory server, and B knows it (nothing free).
    B's request fits only in that room: B's spill is planned anyway, refused, and the refusal makes
    the ledger ask A to give the room up. Before, B planned spills within the free room only, never
    asked, and its request waited for good."""
    doc, other = _prompt(2000, seed=72), _prompt(1500, seed=73)
    expected = offline_texts([doc, other], 8)
    with _two_models_one_memserver(tmp_path, "3MiB") as (cluster, a, b, answer):  # 96 blocks: the document leaves 2
        assert answer("a", doc) == expected[0]
        wait_for(lambda: worker_stats(a)["num_remote_cached_blocks"] >= 94, 10, "A to cache the document there")
        wait_for(lambda: cluster_view(cluster.router)["memservers"][0]["num_free_blocks"] <= 2, 10,
                 "the router to see the memory server full")
        time.sleep(1.5)  # B's hint of the free blocks: re-based by its heartbeats
        assert answer("b", other) == expected[1]
        assert worker_stats(a)["num_remote_cached_blocks"] < 94


async def test_memserver_refuses_another_owners_blocks(tmp_path):
    import torch

    from transport.config import TransportConfig
    from transport.errors import RemoteError
    from transport.node import Node

    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=1,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        address = cluster_view(cluster.router)["memservers"][0]["address"]
        frame = (2, 16, 2, 32)  # one layer's K (or V) of 2 blocks of the tiny model: blocks, block size, kv heads, head dim
        node = await Node.start(TransportConfig.from_env(token=TOKEN.encode()))
        try:
            alice = await node.connect(address)
            bob = await node.connect(address)
            with pytest.raises(RemoteError, match="8 frames"):  # 4 layers x (K, V)
                await alice.request(StoreBlocks("alice", 2), [torch.ones(frame)] * 7)
            reply = await alice.request(StoreBlocks("alice", 2), [torch.ones(frame)] * 8)
            alice_blocks = reply.message.block_ids
            with pytest.raises(RemoteError, match="not_owner"):
                await bob.request(FreeBlocks("bob", alice_blocks))
            with pytest.raises(RemoteError, match="not_owner"):  # one connection, one owner
                await alice.request(FreeBlocks("bob", alice_blocks))
            await _attend_checks(alice, bob, alice_blocks)
            assert (await alice.request(FreeBlocks("alice", alice_blocks))).message.num_blocks == 2
            await _epoch_checks(alice, frame, cluster.memservers[0])
            await alice.close()
            await bob.close()
        finally:
            await node.close()
        cluster.wait_zero_used_blocks()


async def _epoch_checks(alice, frame, memserver) -> None:
    """Epochs fence (services.memserver.messages): a newer one frees what the owner left under older
    ones; messages of an older one never touch blocks handed out since, even under the same ids."""
    import torch

    from transport.errors import RemoteError

    def used() -> int:
        return worker_stats(memserver)["num_used_blocks"]

    kv = [torch.ones(frame)] * 8
    old_blocks = (await alice.request(StoreBlocks("alice", 2, epoch=5), kv)).message.block_ids
    assert used() == 2
    assert (await alice.request(FreeBlocks("alice", (), epoch=6))).message.num_blocks == 0  # the fence alone
    assert used() == 0
    with pytest.raises(RemoteError, match="stale_epoch"):
        await alice.request(StoreBlocks("alice", 2, epoch=5), kv)
    new_blocks = (await alice.request(StoreBlocks("alice", 2, epoch=6), kv)).message.block_ids
    assert new_blocks == old_blocks  # the same ids again: what a late free of the old epoch would hit
    assert (await alice.request(FreeBlocks("alice", old_blocks, epoch=5))).message.num_blocks == 0
    tables, seq_lens = attend_layout([list(new_blocks)], [32], [1])
    with pytest.raises(RemoteError, match="stale_epoch"):
        await alice.request(Attend("alice", 0, 8, 0.2, "float32", 1, 1, 2, epoch=5), [torch.ones(1, 8, 32), tables, seq_lens])
    assert used() == 2
    assert (await alice.request(FreeBlocks("alice", new_blocks, epoch=6))).message.num_blocks == 2


async def _attend_checks(alice, bob, alice_blocks) -> None:
    """Attend over real UCX: a good request is answered; another owner's blocks, a q of the wrong
    dtype and int64 tables are refused with an error that says why; the connection stays usable."""
    import torch

    from transport.errors import RemoteError

    tables, seq_lens = attend_layout([list(alice_blocks)], [32], [1])
    q = torch.ones(1, 8, 32)
    good = Attend("alice", 0, 8, 0.2, "float32", 1, 1, 2)
    out, lse = torch.empty(1, 8, 32), torch.empty(1, 8)
    await alice.request(good, [q, tables, seq_lens], into=[out, lse])
    torch.testing.assert_close(out, torch.ones(1, 8, 32))  # every value in alice's blocks is 1
    with pytest.raises(RemoteError, match="not_owner"):
        await bob.request(Attend("bob", 0, 8, 0.2, "float32", 1, 1, 2), [q, tables, seq_lens])
    with pytest.raises(RemoteError, match=r"q is bfloat16; this pool.s KV \(float32\) is attended in float32"):
        await alice.request(Attend("alice", 0, 8, 0.2, "bfloat16", 1, 1, 2), [q.bfloat16(), tables, seq_lens])
    with pytest.raises(RemoteError, match=r"frame 1 holds 16 B; block_tables \[1, 2\] int32 needs 8 B") as info:
        await alice.request(good, [q, tables.long(), seq_lens])
    assert info.value.code == "bad_request"
    await alice.request(good, [q, tables, seq_lens], into=[out, lse])


async def test_killed_worker_blocks_are_freed_by_memservers(tmp_path):
    prompt = _prompt(1500, seed=50)
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=2,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            async with session.post(cluster.router.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                await asyncio.to_thread(wait_for, lambda: sum(
                    worker_stats(m)["num_used_blocks"] for m in cluster.memservers) > 0, 120, "blocks to spill")
                cluster.workers[0].kill()
                await resp.read()
        wait_for(lambda: all(worker_stats(m)["num_used_blocks"] == 0 for m in cluster.memservers), 10,
                 "memservers to free the dead worker's blocks")


def _signal_tree(proc, sig: int) -> None:
    """A worker and its engine process: a frozen host stops both."""
    children = subprocess.run(["pgrep", "-P", str(proc.popen.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proc.popen.pid, *map(int, children)]:
        os.kill(pid, sig)


async def test_a_worker_frozen_past_its_lease_serves_on_when_it_wakes(tmp_path):
    """A worker frozen (SIGSTOP) past the router's heartbeat timeout is presumed dead: the memory
    server frees the blocks it cached there. Woken, it still counts them as its own. Before the
    server fenced its epoch, the next spill was handed those very ids and its engine died of
    'stored twice'; now the server says the epoch is stale, the worker writes the server off and
    recomputes, and both requests are served as all-local serves them."""
    first, second = _prompt(900, seed=90), _prompt(1000, seed=91)
    expected = await asyncio.to_thread(offline_texts, [first, second], 8)
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=1,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        worker, memserver = cluster.workers[0], cluster.memservers[0]
        async with aiohttp.ClientSession() as session:
            assert (await stream_text(session, cluster.router.url, first, 8))[0] == expected[0]
            assert worker_stats(memserver)["num_used_blocks"] > 0  # the first prompt's blocks, cached there
            _signal_tree(worker, signal.SIGSTOP)
            try:
                await asyncio.to_thread(wait_for, lambda: worker_stats(memserver)["num_used_blocks"] == 0, 30,
                                        "the memory server to free the silent worker's blocks")
            finally:
                _signal_tree(worker, signal.SIGCONT)
            await asyncio.to_thread(wait_for, lambda: num_live_workers(cluster.router) == 1, 30,
                                    "the woken worker to be live again")
            assert (await stream_text(session, cluster.router.url, second, 8))[0] == expected[1]
            assert (await stream_text(session, cluster.router.url, first, 8))[0] == expected[0]
        assert worker.alive, worker.log_tail()
        cluster.wait_zero_used_blocks()


async def test_a_router_frozen_past_the_heartbeat_timeout_keeps_its_cluster_when_it_thaws(tmp_path):
    """Frozen (SIGSTOP; a paused or starved host), the router can hear no heartbeat. Thawed, it held
    that silence against everyone and dropped every memory server from the ledger at once (chaos,
    freeze-router). Now the stall is excused: the memory server stays, the worker's cached blocks
    there stay, and the next request is served."""
    prompt = _prompt(900, seed=92)
    (expected,) = await asyncio.to_thread(offline_texts, [prompt], 8)
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=1,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        memserver, router = cluster.memservers[0], cluster.router
        async with aiohttp.ClientSession() as session:
            assert (await stream_text(session, router.url, prompt, 8))[0] == expected
            held = worker_stats(memserver)["num_used_blocks"]
            assert held > 0  # the prompt's blocks, cached there
            router.popen.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(4)  # twice the router's heartbeat timeout in these tests
            finally:
                router.popen.send_signal(signal.SIGCONT)
            await asyncio.sleep(2)  # heartbeats resume
            assert "router_stalled" in router.log_text()
            assert "memserver_expired" not in router.log_text()
            assert worker_stats(memserver)["num_used_blocks"] == held
            assert (await stream_text(session, router.url, prompt, 8))[0] == expected
        cluster.wait_zero_used_blocks()


async def test_memserver_leaves_gracefully_mid_stream(tmp_path):
    prompts = [_prompt(1000 + 100 * i, seed=60 + i) for i in range(2)]
    expected = await asyncio.to_thread(offline_texts, prompts, 40)
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=2,
                         memserver_capacity=MEMSERVER_CAPACITY) as cluster:
        leavers = []
        # SIGTERM: leave gracefully
        texts = await _streams_around(cluster, prompts, 40, 4, lambda m: (leavers.append(m), m.popen.send_signal(15)))
        assert texts == expected
        (leaver,) = leavers
        assert await asyncio.to_thread(leaver.popen.wait, 60) == 0
        assert "memserver_drained" in leaver.log_text() and "num_blocks_left=0" in leaver.log_text()
        wait_for(lambda: leaver.name not in _memserver_ids(cluster), 10, "the router to drop the memserver that left")
        cluster.wait_zero_used_blocks()


async def test_a_request_that_fits_the_cluster_but_not_beside_another_is_told_to_retry(tmp_path):
    """32 local + 64 remote blocks hold one 1500-token sequence. A second one, sent while the first
    holds blocks on the memory server, is refused with 503 kv_capacity_busy and Retry-After (an
    OpenAI client retries it), not with 400 context_length_exceeded (which says: change the
    request); sent again once the first ended, it is served, its tokens equal all-local ones."""
    first, second = _prompt(600, seed=90), _prompt(700, seed=91)
    (expected,) = await asyncio.to_thread(offline_texts, [second], 800)
    with running_cluster(tmp_path, 1, worker_args=WORKER_ARGS, num_memservers=1,
                         memserver_capacity="2MiB") as cluster:
        memserver = cluster.memservers[0]
        async with aiohttp.ClientSession() as session:
            running = asyncio.create_task(stream_text(session, cluster.router.url, first, 900))
            await asyncio.to_thread(wait_for, lambda: worker_stats(memserver)["num_used_blocks"] >= 4, 120,
                                    "the first request to spill")
            await asyncio.sleep(1.2)  # the worker's hint of the free blocks there: re-based by its heartbeats
            body = {"model": "tiny", "prompt": second, "max_tokens": 800, "temperature": 0, "ignore_eos": True}
            async with session.post(cluster.router.url + "/v1/completions", json=body) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 503 and error["code"] == "kv_capacity_busy", error
                assert resp.headers["Retry-After"] == "1"
                assert "needs 1500" in error["message"] and "retry" in error["message"]
            assert not running.done()
            await running
            text, _ = await stream_text(session, cluster.router.url, second, 800)
            assert text == expected
        cluster.wait_zero_used_blocks()
