"""Reloads and restarts of `ipvslb run` under traffic, on a real kernel: a SIGHUP every
100 ms for 30 s while a client connects through the VIP, and a `kill -9` while a backend is
quarantined. IPVS is read back with `ipvsadm -Ln`; systemd's side of a reload (RELOADING=1,
READY=1) is read from a notify socket the test owns."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from ipvslb.model import HealthSettings
from tests.kernel.conftest import ipvsadm
from tests.kernel.daemonproc import (
    PORT,
    VIP,
    WEIGHT,
    WORK,
    endpoint,
    first_weight,
    kernel_weights,
    wait_for,
    write_config,
)

OTHER_VIP = "10.91.0.2"  # the service the reloads add and remove
RELOADING_FOR, RELOAD_EVERY = 30.0, 0.1


class NotifyListener:
    """The sd_notify socket: every datagram the daemon sends, in order."""

    def __init__(self, path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                return

    def states(self) -> list[str]:
        """RELOADING / READY, in the order sent."""
        return [word for m in list(self.messages) for word in ("RELOADING=1", "READY=1") if word in m.split("\n")]

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def notices():
    listener = NotifyListener(WORK / "notify.sock")
    os.environ["NOTIFY_SOCKET"] = str(listener.path)
    yield listener
    del os.environ["NOTIFY_SOCKET"]
    listener.close()


@pytest.fixture(scope="module")
def daemon(notices, daemon):
    """conftest's daemon, started with NOTIFY_SOCKET pointing at `notices`."""
    return daemon


def tcp_services() -> set[str]:
    return {line.split()[1] for line in ipvsadm("-Ln").splitlines() if line.startswith("TCP ")}


def test_a_reload_every_100ms_for_30s_fails_no_connect_and_leaves_ipvs_as_the_last_file(
        clients, fresh, notices, _session_topology):
    b1, b2, b3 = backends = _session_topology.backends
    other = "\n".join([
        "  - name: other",
        f"    vip: {OTHER_VIP}",
        f"    port: {PORT}",
        "    scheduler: rr",
        "    backends:",
        *[f"      - {{address: {b.v4}, port: {b.port}, weight: {WEIGHT}}}" for b in (b1, b2)],
    ]) + "\n"
    # The file the daemon runs with (write_config's default), and one that differs from it in
    # a backend's weight and one more service.
    files = [([WEIGHT] * 3, ""), ([WEIGHT, WEIGHT, WEIGHT // 2], other)]
    pid = fresh.proc.pid
    before = fresh.status()["reloads"]
    states_before = len(notices.states())
    log_before = len(fresh.log())
    client = clients()
    started, sent = time.monotonic(), 0
    while time.monotonic() - started < RELOADING_FOR:
        weights, extra = files[(sent + 1) % 2]
        write_config(backends, extra, weights)
        fresh.proc.send_signal(signal.SIGHUP)
        sent += 1
        time.sleep(max(0.0, started + sent * RELOAD_EVERY - time.monotonic()))
    client.stop()
    weights, extra = files[sent % 2]
    # The reload under way when the last SIGHUP came is followed by one that reads the last file.
    wait_for(lambda: reloads_settled(fresh, notices), 30, "the last reload done")
    after = fresh.status()
    states = notices.states()[states_before:]
    done = {k: after["reloads"].get(k, 0) - before.get(k, 0) for k in ("ok", "failed")}
    failed = [a for a in client.attempts if not a.ok]
    print(f"{sent} SIGHUPs in {RELOADING_FOR:.0f} s: {done['ok']} reloads done, {done['failed']} failed; "
          f"{len(client.attempts)} connects, {len(failed)} failed, "
          f"slowest {max(a.elapsed for a in client.attempts):.3f} s")
    assert failed == [], [(round(a.started - started, 2), a.error) for a in failed[:10]]
    assert fresh.proc.poll() is None and after["pid"] == pid
    assert done["failed"] == 0 and "reload refused" not in fresh.log()[log_before:]
    # SIGHUPs that come during a reload are one more reload after it, not one each.
    assert 1 <= done["ok"] <= sent
    # systemd hears RELOADING=1 and then READY=1 for each of them, in turn.
    assert states == ["RELOADING=1", "READY=1"] * done["ok"], states[:20]
    assert after["internal_errors"] == {}
    # IPVS is the last file: its services and weights.
    assert kernel_weights() == {endpoint(b): w for b, w in zip(backends, weights, strict=True)}
    if extra:
        assert tcp_services() == {f"{VIP}:{PORT}", f"{OTHER_VIP}:{PORT}"}
        assert kernel_weights(OTHER_VIP) == {endpoint(b1): WEIGHT, endpoint(b2): WEIGHT}
    else:
        assert tcp_services() == {f"{VIP}:{PORT}"}
    # The daemon's view agrees, and every backend is still healthy.
    assert {s["vip"] for s in after["services"]} == {f"{VIP}:{PORT}"} | ({f"{OTHER_VIP}:{PORT}"} if extra else set())
    assert all(b["state"] == "healthy" for s in after["services"] for b in s["backends"])
    write_config(backends)
    fresh.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: tcp_services() == {f"{VIP}:{PORT}"} and kernel_weights() == {
        endpoint(b): WEIGHT for b in backends}, 20, "the default file back")


def reloads_settled(daemon, notices: NotifyListener) -> bool:
    """READY=1 was the last word and no reload ended for a second."""
    first = daemon.status()["reloads"]
    time.sleep(1)
    return notices.states()[-1:] == ["READY=1"] and daemon.status()["reloads"] == first


def test_kill_9_while_a_backend_is_quarantined_keeps_it_at_weight_0_until_its_probes_pass(
        clients, fresh, _session_topology):
    b = _session_topology.backends[2]
    ep = endpoint(b)
    clients()  # the evidence: connects to it refused
    b.set_mode("refuse")
    wait_for(lambda: fresh.backends()[ep]["weight"] == 0, 15, "quarantine")
    assert kernel_weights()[ep] == 0
    fresh.kill(signal.SIGKILL)
    fresh.start()
    row = fresh.backends()[ep]
    assert row["weight"] == 0 and row["state"] in ("quarantined", "probing"), row
    assert kernel_weights()[ep] == 0
    # The new daemon probes it at once; a refusal keeps it out.
    row = wait_for(lambda: (r := fresh.backends()[ep]) and r["counters"].get("probes_failed", 0) >= 1 and r, 15,
                   "a failed probe after the restart")
    assert row["weight"] == 0 and kernel_weights()[ep] == 0, row
    restored = time.monotonic()
    b.set_mode("accept")
    row = wait_for(lambda: (r := fresh.backends()[ep]) and r["weight"] > 0 and r, 30, "back in rotation")
    back_at = first_weight(row, lambda w: w > 0, 0.0)
    print(f"restarted with {ep} quarantined: {row['counters'].get('probes_failed')} probes failed, "
          f"{row['counters'].get('probes_ok')} passed; weight {row['weight']} {back_at - restored:.1f} s after "
          f"it accepted again; weights written since the restart: {row['weight_history']}")
    # Every weight this daemon wrote for it before it accepted again was 0, and it came back
    # through passed probes.
    assert all(w == 0 for t, w in row["weight_history"] if t < restored)
    assert back_at >= restored
    assert row["counters"].get("probes_ok", 0) >= HealthSettings().rise
    assert kernel_weights()[ep] > 0
