"""The step thread's attention lane against a real echo-server process on loopback: requests leave
from the calling thread, replies (inline and tagged frames) land in its buffers, a dead peer fails
the wait promptly, and the lane closes from another thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.worker.attention_lane import AttentionLane
from tests.transport.conftest import TOKEN, fresh_server, start_server  # noqa: F401 (fresh_server: a fixture)
from transport.config import TransportConfig
from transport.errors import PeerUnreachable, TransferTimeout
from transport.wire import Echo

GENEROUS_S = 5.0


@pytest.fixture
def lane():
    lane = AttentionLane(TransportConfig(token=TOKEN.encode()))
    yield lane
    lane.close()


def test_requests_from_the_owning_thread_land_in_its_buffers(fresh_server, lane):
    small, big = torch.arange(16, dtype=torch.float32), torch.randn(256 << 10)  # inline, then tagged (1 MiB)
    outs = [torch.empty(16), torch.empty(256 << 10)]
    first = lane.request(fresh_server.address, Echo(note="a"), [small], into=outs[:1], timeout=GENEROUS_S)
    second = lane.request(fresh_server.address, Echo(note="b"), [big], into=outs[1:], timeout=GENEROUS_S)
    assert lane.wait(second).message.note == "b" and torch.equal(outs[1], big)
    assert lane.wait(first).frames[0] is outs[0] and torch.equal(outs[0], small)
    with pytest.raises(TransferTimeout):
        lane.wait(lane.request(fresh_server.address, Echo(delay_s=2.0), [], into=[], timeout=0.2))
    assert lane.usable_here()
    other = []
    thread = threading.Thread(target=lambda: other.append(lane.usable_here()))
    thread.start()
    thread.join()
    assert other == [False]  # one thread owns the lane


def test_time_away_from_the_lane_is_no_silence(fresh_server, lane):
    """The step computes (a long prefill chunk) between sending and waiting: the lane's loop does
    not run then, so the peer could not be heard; that must not make it look dead."""
    reply = lane.request(fresh_server.address, Echo(note="late"), [torch.ones(8)], into=[None], timeout=GENEROUS_S)
    time.sleep(2.5)  # > the transport's peer timeout (1 s)
    assert lane.wait(reply).message.note == "late"
    reply = lane.request(fresh_server.address, Echo(delay_s=3.0), [], into=[], timeout=GENEROUS_S)
    time.sleep(2.0)  # a peer still busy when the wait starts: it answers pings from then on
    assert lane.wait(reply).message.delay_s == 3.0


def test_dead_peer_fails_the_wait_promptly(lane):
    server = start_server()
    try:
        lane.wait(lane.request(server.address, Echo(), [], into=[], timeout=GENEROUS_S))  # connected
        pending = lane.request(server.address, Echo(delay_s=60.0), [torch.ones(8)], into=[None], timeout=60.0)
        server.kill()
        start = time.monotonic()
        with pytest.raises(PeerUnreachable):
            lane.wait(pending)
        assert time.monotonic() - start < GENEROUS_S
        with pytest.raises(PeerUnreachable):  # nobody listens there any more
            lane.wait(lane.request(server.address, Echo(), [], into=[], timeout=GENEROUS_S))
    finally:
        server.stop()


def test_close_from_another_thread_then_requests_are_refused(fresh_server):
    lane = AttentionLane(TransportConfig(token=TOKEN.encode()))
    lane.wait(lane.request(fresh_server.address, Echo(), [], into=[], timeout=GENEROUS_S))
    thread = threading.Thread(target=lane.close)
    thread.start()
    thread.join(GENEROUS_S)
    assert not thread.is_alive() and not lane.usable_here()
    with pytest.raises(PeerUnreachable, match="closed"):
        lane.request(fresh_server.address, Echo(), [], into=[], timeout=GENEROUS_S)
