"""How a probe's failure is classified for the guards: refused (the path works), local
(this host has no path: no evidence against the backend), or neither (no answer)."""
import asyncio
import errno
import ipaddress
import socket

import pytest

from ipvslb import actions, health, probe

LOCALHOST = ipaddress.ip_address("127.0.0.1")


@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EPERM, errno.EACCES,
                                  errno.EADDRNOTAVAIL])
def test_a_no_path_error_returned_by_the_call_itself_is_local(code):
    outcome = probe.failure(OSError(code, "x"), 0.001, immediate=True)
    assert not outcome.ok and outcome.local and not outcome.refused


@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.EHOSTUNREACH])
def test_the_same_error_arriving_later_came_from_the_network(code):
    # An ICMP unreachable from a router on the way: evidence about the path beyond this host.
    outcome = probe.failure(OSError(code, "x"), 0.05, immediate=False)
    assert not outcome.ok and not outcome.local


def test_a_refusal_is_refused_and_never_local():
    outcome = probe.failure(OSError(errno.ECONNREFUSED, "x"), 0.001, immediate=True)
    assert outcome.refused and not outcome.local
    assert "ECONNREFUSED" in outcome.detail


def test_a_real_refusal_on_loopback_says_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    outcome = asyncio.run(probe.probe_tcp(LOCALHOST, port, 1.0))
    assert not outcome.ok and outcome.refused and not outcome.local


def test_the_daemon_passes_both_flags_to_the_engine():
    outcome = probe.ProbeOutcome(False, "ENETUNREACH (Network is unreachable)", 0.0, local=True)
    result = actions.probe_result((LOCALHOST, 80), outcome, 5.0)
    assert result == health.ProbeResult((LOCALHOST, 80), False, 5.0, outcome.detail, local=True, refused=False)
