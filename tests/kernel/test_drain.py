"""`ipvslb drain` on a real kernel: the daemon over three backends with a client loop. A
drained backend is at weight 0 in IPVS (read back with ipvsadm) at once, a connection it
held goes on, new connects go elsewhere, `--wait` returns once that connection closes; the
drain holds across a restart and a SIGHUP reload; undrain gives the weight back."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from ipvslb import control
from tests.kernel.conftest import ipvsadm
from tests.kernel.daemonproc import PORT, VIP, WEIGHT, WORK, endpoint, kernel_weights, wait_for, write_config

pytestmark = pytest.mark.one_kernel

CONTROL = str(WORK / "control.sock")


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ipvslb", *args, "--socket", CONTROL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def connection_to(name: str, tries: int = 12) -> socket.socket:
    """A connection through the VIP that the scheduler (rr) gave to backend `name`."""
    others = []
    try:
        for _ in range(tries):
            s = socket.create_connection((VIP, PORT), timeout=5)
            if s.makefile("rb").readline().strip().decode() == name:
                return s
            others.append(s)
    finally:
        for s in others:
            s.close()
    raise AssertionError(f"no connection reached {name} in {tries} tries")


def echo(s: socket.socket, word: bytes) -> bytes:
    s.sendall(word + b"\n")
    return s.recv(64)


def test_drain_wait_restart_reload_undrain(fresh, clients, _session_topology):
    backends = _session_topology.backends
    b = backends[0]
    ep = endpoint(b)
    held = connection_to(b.name)
    try:
        client = clients(rate=20)
        time.sleep(1)

        started = time.monotonic()
        answer = control.request(CONTROL, "drain", "web", ep)
        answered = time.monotonic() - started
        assert kernel_weights()[ep] == 0
        in_ipvs = time.monotonic() - started
        assert answer["drained"] is True and answer["weight"] == 0 and answer["active_connections"] >= 1
        assert in_ipvs < 1.0, f"weight 0 in IPVS {in_ipvs:.3f} s after the request"
        drained_at = time.monotonic()

        # The connection established before the drain goes on; new ones avoid the backend.
        assert echo(held, b"still-there") == b"still-there\n"
        time.sleep(3)
        assert echo(held, b"and-now") == b"and-now\n"
        after = [a for a in client.attempts if a.started > drained_at + 0.1]
        assert len(after) >= 40
        assert [a for a in after if not a.ok] == []
        assert {a.backend for a in after} == {x.name for x in backends[1:]}
        row = fresh.backends()[ep]
        assert row["drained"] is True and row["weight"] == 0 and row["state"] == "healthy"

        # --timeout while the connection is open: exit 3, still drained. (Generous waits for
        # the command itself: a Python start takes seconds under emulation on a busy host.)
        timed = cli("drain", "web", ep, "--wait", "--timeout", "1")
        assert timed.wait(120) == 3, timed.stderr.read()
        assert "active connections still after 1 s" in timed.stderr.read()
        assert kernel_weights()[ep] == 0

        # --wait returns once the held connection closes.
        waiting = cli("drain", "web", ep, "--wait", "--timeout", "300")
        assert "already drained, weight 0," in waiting.stdout.readline()
        time.sleep(2)
        assert waiting.poll() is None, waiting.stderr.read()
        closed = time.monotonic()
        held.close()
        assert waiting.wait(30) == 0, waiting.stderr.read()
        wait_returned = time.monotonic() - closed
        assert "no active connections after" in waiting.stdout.read()
        client.stop()
        print(f"drain: answered in {answered * 1000:.1f} ms, weight 0 in ipvsadm {in_ipvs * 1000:.1f} ms "
              f"after the request; {len(after)} connects after it, none to {ep}; "
              f"--wait returned {wait_returned:.2f} s after the held connection closed")

        # Restart: IPVS changed behind the daemon's back meanwhile, the drain is put back.
        fresh.kill()
        ipvsadm("-e", "-t", f"{VIP}:{PORT}", "-r", ep, "-m", "-w", str(WEIGHT))
        fresh.start()
        wait_for(lambda: kernel_weights()[ep] == 0, 10, "weight 0 again after the restart")
        assert fresh.backends()[ep]["drained"] is True
        time.sleep(3)   # health does not raise it (its observed 0 is not a quarantine to resume)
        assert kernel_weights()[ep] == 0 and fresh.backends()[ep]["state"] == "healthy"

        # Reload with a change to another backend: the drain stays.
        reloads = fresh.status()["reloads"].get("ok", 0)
        write_config(backends, weights=[WEIGHT, WEIGHT, WEIGHT // 2])
        fresh.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: fresh.status()["reloads"].get("ok", 0) > reloads, 20, "the reload")
        assert kernel_weights() == {ep: 0, endpoint(backends[1]): WEIGHT, endpoint(backends[2]): WEIGHT // 2}
        assert fresh.backends()[ep]["drained"] is True

        # Undrain: the weight health wants (healthy: the configured one).
        undrain = cli("undrain", "web", ep)
        assert undrain.wait(120) == 0, undrain.stderr.read()
        assert kernel_weights()[ep] == WEIGHT
        assert "drained" not in fresh.backends()[ep]
        probe = clients(rate=20)
        time.sleep(2)
        probe.stop()
        assert b.name in {a.backend for a in probe.attempts}
    finally:
        held.close()
        try:
            control.request(CONTROL, "undrain", "web", ep)
        except (OSError, control.ControlError):
            pass
        write_config(backends)
        if fresh.proc.poll() is None:
            fresh.proc.send_signal(signal.SIGHUP)


def test_a_bad_request_is_answered_and_the_daemon_goes_on(fresh):
    bad = cli("drain", "web", "10.9.9.9:80")
    assert bad.wait(120) == 1
    assert 'service web has no backend "10.9.9.9:80"' in bad.stderr.read()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(CONTROL)
        s.sendall(b"\x00\xff" * 5000)
        s.shutdown(socket.SHUT_WR)
        assert b'"ok": false' in s.recv(4096)
    assert fresh.proc.poll() is None and fresh.status()["internal_errors"] == {}
