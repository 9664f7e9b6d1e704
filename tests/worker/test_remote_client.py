"""RemoteKVClient.submit_attention through the event loop (the path of callers that are not the
step thread, or with the lane off): the request is posted by a callback, and every outcome settles
the step's future (no sockets: a fake connection). The lane: tests/worker/test_attention_lane.py."""

from __future__ import annotations

import asyncio
import types
import threading

import pytest
import torch

from services.memserver.messages import Attend, FreeBlocks, attend_layout
from services.worker.engine.remote import AttentionCall, MemserverLost, RemoteSpan
from services.worker.remote_client import RemoteKVClient
from transport.client import Reply
from transport.errors import PeerUnreachable, RemoteError


class FakeConnection:
    def __init__(self, outcome):
        self.outcome = outcome  # "ok", an exception to fail the reply with, or one to raise at once
        self.sent: list[tuple[Attend, list]] = []

    async def request(self, message, frames, *, into, timeout):  # the dialing path awaits it
        return await self.start_request(message, frames, into=into, timeout=timeout)

    def start_request(self, message, frames, *, into, timeout):
        if isinstance(self.outcome, BaseException) and not isinstance(self.outcome, (PeerUnreachable, RemoteError)):
            raise self.outcome
        self.sent.append((message, frames))
        future = asyncio.get_running_loop().create_future()
        if self.outcome == "ok":
            into[0].copy_(frames[0] * 2)
            into[1].fill_(0.5)
            future.set_result(Reply(message, into))
        else:
            future.set_exception(self.outcome)
        return future


class FakePool:
    def __init__(self, conn, dial=None):
        self.conn = conn
        self.dial = dial  # None: ms0 is connected; else what dialing it gives (a connection or an error)

    def peek(self, address):
        return self.conn if address == "ms0:1" and self.dial is None else None

    async def get(self, address):
        if isinstance(self.dial, BaseException):
            raise self.dial
        return self.dial


class FakeNode:
    def __init__(self, conn, dial=None):
        self.pool = FakePool(conn, dial)


class FakeLedger:
    owner = "w0"

    async def repay(self, memserver_id, num_blocks):
        pass


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _client(loop, conn, dial=None) -> RemoteKVClient:
    client = RemoteKVClient(loop, FakeNode(conn, dial), FakeLedger(), attention_lane=False)
    client.configure({"head_dim": 4, "block_size": 16})
    client.update({"memservers": {"ms0": "ms0:1"}})
    return client


def _call(layer: int = 2) -> AttentionCall:
    return AttentionCall(layer, torch.ones(1, 2, 4), *attend_layout([[5, 6]], [32], [1]))


def test_reply_lands_in_fresh_buffers_and_the_header_describes_the_frames(loop):
    conn = FakeConnection("ok")
    client = _client(loop, conn)
    out, lse = client.submit_attention([("ms0", _call())])[0].result(timeout=5)
    assert torch.equal(out, torch.full((1, 2, 4), 2.0)) and lse.dtype == torch.float32
    message, frames = conn.sent[0]
    assert message == Attend("w0", 2, 2, 0.5, "float32", 1, 1, 2, client.epoch_of("ms0"))
    message.check_frames(tuple(f.numel() * f.element_size() for f in frames), head_dim=4, q_itemsize=4)


@pytest.mark.parametrize("error", [PeerUnreachable("gone"), RemoteError("nope", "not_owner")])
def test_transport_failures_become_memserver_lost_and_are_reported_once(loop, error):
    client = _client(loop, FakeConnection(error))
    with pytest.raises(MemserverLost, match="ms0"):
        client.submit_attention([("ms0", _call())])[0].result(timeout=5)
    assert client.lost_memservers() == {"ms0"} and client.lost_memservers() == set()


def test_a_bug_on_the_loop_fails_the_step_instead_of_hanging(loop):
    client = _client(loop, FakeConnection(ValueError("non-contiguous tensor refused")))
    with pytest.raises(ValueError, match="non-contiguous"):
        client.submit_attention([("ms0", _call())])[0].result(timeout=5)


def test_unknown_memserver_is_lost(loop):
    with pytest.raises(MemserverLost, match="address unknown"):
        _client(loop, FakeConnection("ok")).submit_attention([("ms9", _call())])[0].result(timeout=5)


def test_with_no_connection_yet_it_dials_then_attends(loop):
    conn = FakeConnection("ok")
    out, _ = _client(loop, None, dial=conn).submit_attention([("ms0", _call())])[0].result(timeout=5)
    assert torch.equal(out, torch.full((1, 2, 4), 2.0)) and len(conn.sent) == 1


@pytest.mark.parametrize("dial,reply", [(PeerUnreachable("refused"), "ok"), (None, PeerUnreachable("gone"))],
                         ids=["dial-fails", "reply-fails"])
def test_a_failed_dial_or_reply_on_the_dialing_path_is_memserver_lost_once(loop, dial, reply):
    client = _client(loop, None, dial=dial if dial is not None else FakeConnection(reply))
    with pytest.raises(MemserverLost, match="ms0"):
        client.submit_attention([("ms0", _call())])[0].result(timeout=5)
    assert client.lost_memservers() == {"ms0"} and client.lost_memservers() == set()


class SpillLedger:
    """Grants from ms0 first (most free), then from ms1; records every settle."""

    owner = "w0"

    def __init__(self):
        self.settled: list[tuple[str, int, bool]] = []
        self.cut_off: set[str] = set()

    async def borrow(self, num_blocks, near=(), need=0):
        order = [m for m in ("ms0", "ms1") if m not in self.cut_off]
        return [{"reservation_id": f"r{len(self.settled)}-{m}", "memserver_id": m, "address": f"{m}:1",
                 "num_blocks": num_blocks} for m in order[:1]]

    async def settle(self, reservation_id, num_stored, unreachable=False):
        self.settled.append((reservation_id.split("-")[1], num_stored, unreachable))
        if num_stored == 0:  # refused or unreachable: the next borrow goes elsewhere
            self.cut_off.add(reservation_id.split("-")[1])


class StoreConnection:
    def __init__(self, outcome):
        self.outcome = outcome

    async def request(self, message, frames, *, timeout):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return Reply(types.SimpleNamespace(block_ids=list(range(message.num_blocks))), [])


class StorePool:
    def __init__(self, outcomes):
        self.outcomes = outcomes

    async def get(self, address):
        return StoreConnection(self.outcomes[address.split(":")[0]])


@pytest.mark.parametrize("error,unreachable", [(PeerUnreachable("gone"), True), (RemoteError("full", "full"), False)],
                         ids=["dead", "full"])
def test_a_spill_reports_a_creditor_it_could_not_reach_and_stores_elsewhere(loop, error, unreachable):
    # The ledger must learn the difference: a full creditor is asked again later, a dead one is
    # lent from no more until it heartbeats (else every worker is sent back to it until it expires).
    ledger = SpillLedger()
    node = types.SimpleNamespace(pool=StorePool({"ms0": error, "ms1": "ok"}))
    client = RemoteKVClient(loop, node, ledger, attention_lane=False)
    client.configure({"head_dim": 4, "block_size": 16})
    kv = torch.zeros(2, 2, 3, 16, 1, 4)  # [layers, K/V, blocks, block_size, Hkv, D]
    (span,) = client.spill("req-1", kv, start_token=32)
    assert span.memserver_id == "ms1" and len(span.block_ids) == 3 and span.start_token == 32
    assert ledger.settled == [("ms0", 0, unreachable), ("ms1", 3, False)]
    # A full creditor answered: nothing of ours is there. An unreachable one may have taken the
    # blocks without our hearing of it: written off (newer epoch), they are freed once it answers.
    assert client.lost_memservers() == ({"ms0"} if unreachable else set())


def test_a_store_refused_for_a_stale_epoch_writes_that_server_off(loop):
    # The server freed our blocks unasked (our lease expired while this worker was frozen): what
    # lived there must be recomputed, and later messages go out under a newer epoch.
    ledger = SpillLedger()
    node = types.SimpleNamespace(pool=StorePool({"ms0": RemoteError("epoch 5 of w0 is stale", "stale_epoch"),
                                                 "ms1": "ok"}))
    client = RemoteKVClient(loop, node, ledger, attention_lane=False)
    client.configure({"head_dim": 4, "block_size": 16})
    old = client.epoch_of("ms0")
    (span,) = client.spill("req-1", torch.zeros(2, 2, 3, 16, 1, 4), start_token=0)
    assert span.memserver_id == "ms1"
    assert client.lost_memservers() == {"ms0"}
    assert client.epoch_of("ms0") > old and client.epoch_of("ms1") == old


class RecordingConnection:
    def __init__(self):
        self.sent = []

    async def request(self, message, frames=(), *, timeout):
        self.sent.append(message)
        return Reply(types.SimpleNamespace(num_blocks=0), [])


def test_a_lost_memserver_is_written_off_under_a_newer_epoch_once_the_router_lists_it(loop):
    # The engine recomputed our sequences there: their blocks are garbage. A late free of theirs
    # keeps the old epoch (the server ignores it once it heard the new one); the write-off is an
    # empty free of the new epoch, sent when the server is listed again, and only until it is heard.
    conn = RecordingConnection()
    node = types.SimpleNamespace(pool=types.SimpleNamespace(get=lambda address: _ready(conn)))
    client = RemoteKVClient(loop, node, FakeLedger(), attention_lane=False)
    old = client.epoch_of("ms0")
    client._mark_lost("ms0", "peer silent for 1.0 s")
    assert client.lost_memservers() == {"ms0"}
    new = client.epoch_of("ms0")
    assert new > old and client.epoch_of("ms1") == old

    def heartbeat():
        asyncio.run_coroutine_threadsafe(_update(client, {"memservers": {"ms0": "ms0:1"}}), loop).result(5)

    heartbeat()
    assert conn.sent == [FreeBlocks("w0", (), new)]
    heartbeat()  # acknowledged: not sent again
    assert conn.sent == [FreeBlocks("w0", (), new)]
    client.release([RemoteSpan("ms0", (3, 4), 0, old)])
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0.1), loop).result(5)
    assert conn.sent[1] == FreeBlocks("w0", (3, 4), old)



def test_the_free_blocks_hint_never_exceeds_what_the_cluster_has(loop):
    """A free adds its blocks to the hint at once; when the heartbeat answer that already counts
    them came first, the sum is more than the memory servers hold, and admission would let in a
    request no server has room for."""
    conn = RecordingConnection()
    node = types.SimpleNamespace(pool=types.SimpleNamespace(get=lambda address: _ready(conn)))
    client = RemoteKVClient(loop, node, FakeLedger(), attention_lane=False)
    asyncio.run_coroutine_threadsafe(_update(client, {"memservers": {"ms0": "ms0:1"}, "free_blocks": 31,
                                                      "capacity_blocks": 32}), loop).result(5)
    assert client.free_blocks() == 31
    client.release([RemoteSpan("ms0", (3, 4), 0, client.epoch_of("ms0"))]).result(5)
    assert conn.sent[-1].block_ids == (3, 4) and client.free_blocks() == 32


async def _ready(value):
    return value


async def _update(client, kv):
    client.update(kv)
    for _ in range(10):  # let the write-off task run
        await asyncio.sleep(0.01)


class FailingFree(RecordingConnection):
    def __init__(self, error):
        super().__init__()
        self.error = error

    async def request(self, message, frames=(), *, timeout):
        self.sent.append(message)
        if self.error is not None and message.block_ids:
            raise self.error
        return Reply(types.SimpleNamespace(num_blocks=0), [])


@pytest.mark.parametrize("error,lost", [(PeerUnreachable("peer silent for 1.00 s"), True),
                                        (RemoteError("block 3 is not held by w0", "not_owner"), False)],
                         ids=["silent", "refused"])
def test_a_free_that_cannot_reach_its_server_writes_that_server_off(loop, error, lost):
    # A frozen memory server misses the free and still holds the blocks for us when it thaws: they
    # stayed held for good (32 blocks, chaos). Written off under a newer epoch, they are freed once
    # it answers. A server that answered (refused) keeps our epoch: nothing of ours is left there.
    conn = FailingFree(error)
    node = types.SimpleNamespace(pool=types.SimpleNamespace(get=lambda address: _ready(conn)))
    client = RemoteKVClient(loop, node, FakeLedger(), attention_lane=False)
    asyncio.run_coroutine_threadsafe(_update(client, {"memservers": {"ms0": "ms0:1"}}), loop).result(5)
    old = client.epoch_of("ms0")
    client.release([RemoteSpan("ms0", (3, 4), 0, old)]).result(5)
    assert client.lost_memservers() == ({"ms0"} if lost else set())
    conn.error = None
    asyncio.run_coroutine_threadsafe(_update(client, {"memservers": {"ms0": "ms0:1"}}), loop).result(5)
    if lost:
        assert client.epoch_of("ms0") > old and conn.sent[-1] == FreeBlocks("w0", (), client.epoch_of("ms0"))
    else:
        assert client.epoch_of("ms0") == old and conn.sent == [FreeBlocks("w0", (3, 4), old)]
