"""A child's listening port is chosen below the kernel's ephemeral range, where no outgoing
connection can take it between the choice and the child's bind."""

import socket

from services.runtime import ports


def test_a_free_port_below_the_ephemeral_range_that_binds():
    low = ports._ephemeral_low()
    chosen = {ports.free_port() for _ in range(20)}
    for port in chosen:
        assert low is None or ports._LOWEST <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when chosen


def test_a_port_in_use_is_never_chosen(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setattr(ports.random, "sample", lambda population, k: [taken, taken + 1])
        monkeypatch.setattr(ports, "_ephemeral_low", lambda: taken + 2000)
        monkeypatch.setattr(ports, "_LOWEST", taken)
        assert ports.free_port() != taken
