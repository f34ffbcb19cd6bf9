"""Direct probes against sockets on this host's loopback (no VM needed)."""
from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from ipvslb import probe

LOCALHOST = ipaddress.ip_address("127.0.0.1")


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_tcp_probe_to_a_listener_connects(listener):
    outcome = asyncio.run(probe.probe_tcp(LOCALHOST, listener.getsockname()[1], 1.0))
    assert outcome.ok and outcome.detail == "connected"


def test_tcp_refusal_is_known_before_the_event_loop_runs():
    started = probe.TcpProbe(LOCALHOST, closed_port())
    assert started.outcome is not None and not started.outcome.ok
    assert "ECONNREFUSED" in started.outcome.detail
    assert asyncio.run(started.result(1.0)) == started.outcome


def test_a_probe_answered_at_once_is_closed_without_the_event_loop_and_resets_the_backend(listener):
    # On loopback the handshake completes inside connect(): the daemon judges the outcome
    # in the same step and only closes the probe, with RST so no TIME_WAIT is left.
    started = probe.TcpProbe(LOCALHOST, listener.getsockname()[1])
    assert started.outcome is not None and started.outcome.ok
    started.close()
    assert started.sock.fileno() == -1
    accepted, _ = listener.accept()
    with accepted, pytest.raises(ConnectionResetError):
        accepted.recv(1)


def test_tcp_probe_times_out_when_syns_are_dropped():
    # A full accept queue drops new SYNs (tcp_abort_on_overflow=0): the connect hangs.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        outcome = asyncio.run(probe.probe_tcp(LOCALHOST, port, 0.2))
        assert not outcome.ok and outcome.detail == "no answer within 200 ms"
        assert 0.15 < outcome.elapsed < 1.0
    finally:
        for c in fillers:
            c.close()
        s.close()
