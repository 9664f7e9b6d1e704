"""The chaos scenario's verdicts: what counts as a correct answer while processes die."""

import argparse

import pytest

from loadtest.scenarios.chaos import DEFAULT_FAULTS, EXPECTED_ERRORS, WORKER_KILLED, _body, _classify, _faults


@pytest.mark.parametrize("outcome,detail,verdict", [
    ("ok", "the same text", "ok"),
    ("ok", "the same tex", "MISMATCH"),  # one token short or different: a wrong answer
    ("cut", "", "cut"),
    ("error_event", "generation failed: the cluster lost KV capacity: this sequence needs 2224 tokens",
     "told: lost KV capacity"),
    ("error_event", "generation failed: engine process died: exited with status -9", "told: engine process died"),
    ("error_event", "generation failed: boom", "BAD error_event"),
    ("http", "400 context_length_exceeded", "refused: 400 context_length_exceeded"),
    ("http", "503 no_worker_available", "refused: 503 no_worker_available"),
    ("http", "503 kv_capacity_busy", "refused: 503 kv_capacity_busy"),  # told to retry: other sequences hold the room
    ("http", "503 engine_unavailable", "BAD http"),  # the router should have tried the other worker
    ("http", "500 internal_error", "BAD http"),
    ("eof", "partial", "BAD eof"),
    ("exception", "ServerDisconnectedError()", "BAD exception"),
])
def test_verdicts(outcome, detail, verdict):
    assert _classify(outcome, detail, "the same text") == verdict


def test_requests_are_reproducible_and_mix_greedy_and_seeded_sampling():
    assert _body(4, 24) == _body(4, 24)
    assert len(_body(3, 24)["prompt"]) == 1500 and _body(3, 24)["temperature"] == 0
    assert _body(4, 24)["seed"] == 1004 and _body(5, 24)["top_k"] == 40


def test_a_stream_cut_by_a_dead_worker_is_expected_only_when_workers_are_killed():
    detail = "worker worker1 failed mid-stream: stream ended before the sequence finished"
    assert _classify("error_event", detail, "x") == "BAD error_event"  # no worker dies by default: a bug
    assert _classify("error_event", detail, "x", EXPECTED_ERRORS + (WORKER_KILLED,)) == "told: failed mid-stream"


def test_fault_kinds_are_checked():
    assert _faults("freeze-worker, kill-worker,kill") == ("freeze-worker", "kill-worker", "kill")
    assert _faults("freeze-router") == ("freeze-router",)
    assert "kill-worker" not in DEFAULT_FAULTS
    with pytest.raises(argparse.ArgumentTypeError, match="freeze-worker"):
        _faults("kill,freeze-workers")


def test_a_failed_end_check_says_which_processes_hold_blocks(monkeypatch):
    from loadtest import cluster_check

    body = {"workers": [{"worker_id": "w0", "num_used_blocks": 32, "silent": True},
                        {"worker_id": "w1", "num_used_blocks": 0}],
            "memservers": [{"memserver_id": "m0", "num_used_blocks": 4}],
            "lent": [{"worker_id": "w1", "memserver_id": "m0", "num_blocks": 4}]}
    monkeypatch.setattr(cluster_check.probe, "get_json", lambda url, token: (200, body))
    assert cluster_check._holders("http://router", "t") == ["w0: 32 used (silent)", "m0: 4 used", "lent: w1 -> m0 4"]
