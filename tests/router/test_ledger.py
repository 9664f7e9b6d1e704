import pytest

from services.router.ledger import InsufficientCapacity, Ledger


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _ledger(clock=None):
    ledger = Ledger(heartbeat_timeout_s=3.0, clock=clock or Clock())
    ledger.register("ms-a", "127.0.0.1:1", "cpu", num_blocks=100, num_free=100)
    ledger.register("ms-b", "127.0.0.1:2", "cpu", num_blocks=60, num_free=60)
    return ledger


def test_borrow_prefers_most_free_and_spreads_over_few_servers():
    ledger = _ledger()
    grants = ledger.borrow("w1", 30)
    assert [(g.memserver_id, g.num_blocks) for g in grants] == [("ms-a", 30)]
    grants = ledger.borrow("w1", 100)  # a has 70 unreserved, b 60
    assert [(g.memserver_id, g.num_blocks) for g in grants] == [("ms-a", 70), ("ms-b", 30)]
    assert ledger.free_blocks() == 30 and ledger.capacity_blocks() == 160  # lent or not


def test_borrow_fills_the_servers_already_holding_the_sequence_first():
    ledger = _ledger()
    grants = ledger.borrow("w1", 20, near=("ms-b",))  # b has less free, but holds the sequence
    assert [(g.memserver_id, g.num_blocks) for g in grants] == [("ms-b", 20)]
    grants = ledger.borrow("w1", 50, near=("ms-b",))  # b has 40 unreserved: the rest from the most free
    assert [(g.memserver_id, g.num_blocks) for g in grants] == [("ms-b", 40), ("ms-a", 10)]
    (grant,) = ledger.borrow("w1", 5, near=("ms-gone",))  # an unknown id is no preference
    assert grant.memserver_id == "ms-a"
    (grant,) = _ledger().borrow("w1", 5, near=("ms-b", "ms-a", "ms-b"))  # a repeat keeps its first place
    assert grant.memserver_id == "ms-b"


def test_reservation_holds_capacity_until_settled():
    ledger = _ledger()
    (grant,) = ledger.borrow("w1", 50)
    assert ledger.free_blocks() == 110
    ledger.settle(grant.reservation_id, 50)
    assert ledger.free_blocks() == 110
    assert ledger.lent() == {("w1", "ms-a"): 50}
    ledger.repay("w1", "ms-a", 50)
    assert ledger.lent() == {} and ledger.free_blocks() == 160


def test_refused_reservation_is_released_and_the_refusing_server_lends_less_until_it_heartbeats():
    # A refusal says the server had fewer than 10 free, whatever its last heartbeat said: granted
    # again, the next borrower was refused too (three times in 10 ms after a router stall, chaos).
    ledger = _ledger()
    (grant,) = ledger.borrow("w1", 10)
    assert grant.memserver_id == "ms-a"
    ledger.settle(grant.reservation_id, 0)
    assert ledger.lent() == {} and ledger.available("ms-a") == 9 and ledger.free_blocks() == 69
    assert [g.memserver_id for g in ledger.borrow("w2", 10)] == ["ms-b"]
    ledger.heartbeat("ms-a", num_free=100, holdings={})  # the truth again
    assert ledger.available("ms-a") == 100


def test_a_creditor_found_unreachable_lends_nothing_until_it_heartbeats():
    ledger = _ledger()
    (grant,) = ledger.borrow("w1", 10)
    assert grant.memserver_id == "ms-a"
    assert ledger.settle(grant.reservation_id, 0, unreachable=True) == "ms-a"
    assert ledger.capacity_blocks() == 60
    # Every borrow goes elsewhere, and the cluster's free capacity no longer counts it.
    assert [(g.memserver_id, g.num_blocks) for g in ledger.borrow("w2", 60)] == [("ms-b", 60)]
    with pytest.raises(InsufficientCapacity, match="0 free KV blocks"):
        ledger.borrow("w2", 1)
    # A second report of the same server is not news.
    ledger2 = _ledger()
    g1, g2 = ledger2.borrow("w1", 1), ledger2.borrow("w2", 1)
    assert ledger2.settle(g1[0].reservation_id, 0, unreachable=True) == "ms-a"
    assert ledger2.settle(g2[0].reservation_id, 0, unreachable=True) is None
    # Alive after all: its next heartbeat makes it a creditor again.
    ledger.heartbeat("ms-a", num_free=100, holdings={})
    assert ledger.borrow("w2", 100)[0].memserver_id == "ms-a"


def test_insufficient_capacity_names_the_numbers():
    ledger = _ledger()
    with pytest.raises(InsufficientCapacity, match="160 free KV blocks on memory servers; 161 wanted"):
        ledger.borrow("w1", 161)


def test_heartbeat_is_the_truth_and_silence_removes():
    clock = Clock()
    ledger = _ledger(clock)
    ledger.heartbeat("ms-a", num_free=90, holdings={"w1": 6, "w2": 4})
    assert ledger.lent() == {("w1", "ms-a"): 6, ("w2", "ms-a"): 4}
    clock.now = 2.0
    ledger.heartbeat("ms-a", num_free=90, holdings={"w1": 6, "w2": 4})
    clock.now = 3.5
    assert ledger.expire() == ["ms-b"]
    assert [s.memserver_id for s in ledger.servers()] == ["ms-a"]


def test_leaving_server_lends_nothing():
    ledger = _ledger()
    ledger.leave("ms-a")
    grants = ledger.borrow("w1", 10)
    assert [g.memserver_id for g in grants] == ["ms-b"]
    assert ledger.free_blocks() == 50 and ledger.capacity_blocks() == 60


def test_stale_reservations_expire():
    clock = Clock()
    ledger = Ledger(heartbeat_timeout_s=100, reservation_timeout_s=5, clock=clock)
    ledger.register("ms-a", "x", "cpu", 10, 10)
    ledger.borrow("w1", 10)
    assert ledger.free_blocks() == 0
    clock.now = 6
    ledger.expire()
    assert ledger.free_blocks() == 10


def test_a_refused_borrow_asks_the_other_workers_for_their_cached_blocks_until_room_is_free():
    clock = Clock()
    ledger = _ledger(clock)
    for g in ledger.borrow("w1", 150):  # w1 holds (say, only caches) 150 of 160
        ledger.settle(g.reservation_id, g.num_blocks)
    with pytest.raises(InsufficientCapacity):
        ledger.borrow("w2", 40)  # 10 free
    assert (ledger.wanted_by_others("w1"), ledger.wanted_by_others("w2")) == (30, 0)
    ledger.repay("w1", "ms-a", 20)  # w1 gave up 20: 10 more wanted
    assert ledger.wanted_by_others("w1") == 10
    ledger.repay("w1", "ms-a", 10)
    assert ledger.wanted_by_others("w1") == 0
    ledger.borrow("w2", 40)  # and w2's next try is served
    with pytest.raises(InsufficientCapacity):
        ledger.borrow("w2", 10)
    assert ledger.wanted_by_others("w1") == 10
    clock.now += 3.5  # a refusal older than the heartbeat timeout is no longer a need
    assert ledger.wanted_by_others("w1") == 0
    with pytest.raises(InsufficientCapacity):
        ledger.borrow("w2", 4, need=60)  # a spill of 4 blocks, of a sequence that needs 60 there
    assert ledger.wanted_by_others("w1") == 60


def test_time_the_router_itself_stalled_counts_against_no_lease_or_reservation():
    # Frozen 5 s, the router could hear no heartbeat: thawed, it dropped every memory server at
    # once (chaos, freeze-router). The stall is excused; silence before and after it still counts.
    clock = Clock()
    ledger = _ledger(clock)
    ledger.borrow("w1", 10)
    clock.now = 1.0
    ledger.heartbeat("ms-a", num_free=100, holdings={})
    clock.now = 6.5  # a 5 s stall began at 1.5
    ledger.excuse(5.0)
    assert ledger.expire() == []  # ms-b last heard at 0 + 5: 1.5 s of real silence
    assert ledger.free_blocks() == 150  # the reservation holds
    clock.now = 8.0
    assert ledger.expire() == ["ms-b"]  # 3 s of silence outside the stall
    ledger.excuse(100.0)  # never beyond now
    clock.now = 10.9
    assert ledger.expire() == []
    clock.now = 11.0
    assert ledger.expire() == ["ms-a"]
