"""UDP health on a real kernel: the tracer's ICMP unreachables, and the daemon taking out a
backend whose listener is gone (ICMP port unreachable) or that stops answering (the reply
window, then a probe), IPv4 and IPv6, under a client that sends each request from a new
socket (a new IPVS flow) and counts a request lost when no reply comes within 1 s."""
from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import threading
import time

import pytest

from ipvslb.model import HealthSettings
from ipvslb.tracer.records import Kind, Vip
from ipvslb.udpwatch import STEPS
from tests.kernel.conftest import ipvsadm
from tests.kernel.daemonproc import SOCKET, WORK, running, wait_for
from tests.kernel.test_smoke import PORT, add_service

VIPS = {4: "10.92.0.1", 6: "fd92::1"}
VIP_PORT = 5300
RATE, LOST_AFTER = 20, 1.0
DEFAULTS = HealthSettings()
UDP_PROBE_TIMEOUT = 1.0  # health: a backend without connect times is probed with 1 s
# Measured on Debian's 6.1: a backend's ICMPv6 error for a flow through IPVS never reaches
# the client (its requests meet silence), although the backend answers a direct probe with
# ICMPv6 port unreachable; 6.12 delivers it. The reply window catches the backend there.
NO_ICMPV6_THROUGH_IPVS = pytest.mark.xfail(
    os.uname().release.startswith("6.1."), strict=True,
    reason="6.1 loses the backend's ICMPv6 error for a flow through IPVS (docs/health.md, UDP)")


def families():
    return [4, pytest.param(6, marks=NO_ICMPV6_THROUGH_IPVS)]


def endpoint(address, port: int) -> str:
    return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"


# -- the tracer alone ----------------------------------------------------------------------

def ask(vip: str, port: int, timeout: float = 1.0) -> tuple[int, bytes | int]:
    """One request from a new connected socket: (client port, reply or errno)."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((vip, port))
        try:
            s.send(b"ping")
            return s.getsockname()[1], s.recv(65535)
        except OSError as err:
            return s.getsockname()[1], err.errno or 0


def unreachables(tracer, client_port: int, wait: float = 0.5) -> list:
    deadline, found = time.monotonic() + wait, []
    while time.monotonic() < deadline:
        found += [e for e in tracer.read(timeout_ms=50) if e.kind is Kind.UNREACHABLE and e.client[1] == client_port]
    return found


@pytest.mark.parametrize("family", families())
def test_an_unreachable_from_the_backend_is_traced_to_it_and_one_from_ipvs_never(tracer, topo, family):
    vip = {4: "10.90.0.1", 6: "fd90::1"}[family]
    closed, serving = topo.backends[0], topo.backends[1]
    tracer.set_vips([Vip("udp", ipaddress.ip_address(vip), PORT)])
    tracer.read()
    target = add_service(topo, vip, [closed], udp=True)
    closed.set_udp("close")
    port, answer = ask(vip, PORT)
    assert answer == errno.ECONNREFUSED, f"the client should see the backend's ICMP, got {answer!r}"
    records = unreachables(tracer, port)
    assert len(records) == 1, f"one ICMP, one record (however often the kprobes were attached): {records}"
    [record] = records
    assert record.backend == (closed.address(family), closed.port) and record.protocol == "udp"
    assert record.vip == (ipaddress.ip_address(vip), PORT)
    assert record.icmp_code == (3 if family == 4 else 4), str(record)  # port unreachable

    # With no usable destination IPVS drops the request on its way out (send() fails with
    # EPERM) and answers it with an ICMP port unreachable of its own.
    real = endpoint(closed.address(family), closed.port)
    ipvsadm("-e", "-u", target, "-r", real, "-m", "-w", "0")
    port, answer = ask(vip, PORT)
    assert answer in (errno.EPERM, errno.ECONNREFUSED), f"IPVS should have refused the flow itself, got {answer!r}"
    assert unreachables(tracer, port) == []

    # A backend that answers draws no unreachable.
    ipvsadm("-a", "-u", target, "-r", endpoint(serving.address(family), serving.port), "-m")
    port, answer = ask(vip, PORT)
    assert isinstance(answer, bytes) and answer.startswith(serving.name.encode())
    assert unreachables(tracer, port) == []


# -- the daemon ----------------------------------------------------------------------------

def write_config(backends) -> str:
    WORK.mkdir(parents=True, exist_ok=True)
    lines = ["settings:", f"  state_dir: {WORK}/state", f"  status_socket: {SOCKET}",
             "  metrics_address: ''", "  log_level: debug", "services:"]
    for family, vip in VIPS.items():
        lines += [f"  - name: udp{family}", "    protocol: udp", f"    vip: {vip}", f"    port: {VIP_PORT}",
                  "    scheduler: rr",
                  # The backends echo "<name> <request>": a probe's reply must carry it back.
                  "    health: {udp_probe_payload: health-check, udp_probe_expect: health-check}",
                  "    backends:",
                  *[f"      - {{address: '{b.address(family)}', port: {b.port}}}" for b in backends]]
    path = WORK / "udp.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def udp_daemon(_session_topology):
    _session_topology.reset()
    with running(write_config(_session_topology.backends), log_tail=6000) as d:
        yield d
    _session_topology.reset()


class UdpClients:
    """RATE requests a second, each from a new connected socket; a request is lost when no
    reply (an error, such as the ECONNREFUSED an ICMP unreachable brings, or nothing) comes
    within LOST_AFTER seconds."""

    def __init__(self, vip: str):
        self.vip, self.family = vip, socket.AF_INET6 if ":" in vip else socket.AF_INET
        self.requests: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, dict] = {}
        next_send = time.monotonic()
        while not self._stop.is_set() or pending:
            now = time.monotonic()
            if not self._stop.is_set() and now >= next_send:
                next_send += 1 / RATE
                s = socket.socket(self.family, socket.SOCK_DGRAM)
                s.setblocking(False)
                request = {"sent": now, "reply": None, "error": None}
                try:
                    s.connect((self.vip, VIP_PORT))
                    s.send(b"request")
                except OSError as err:
                    request["error"] = errno.errorcode.get(err.errno, str(err))
                    s.close()
                else:
                    pending[s] = request
                    sel.register(s, selectors.EVENT_READ)
                self.requests.append(request)
            for key, _ in sel.select(timeout=max(0.0, min(0.01, next_send - time.monotonic()))):
                s = key.fileobj
                request = pending.pop(s)
                try:
                    request["reply"] = s.recv(65535).split(b" ")[0].decode()
                    request["answered"] = time.monotonic()
                except OSError as err:
                    request["error"] = errno.errorcode.get(err.errno, str(err))
                sel.unregister(s)
                s.close()
            now = time.monotonic()
            for s, request in list(pending.items()):
                if now - request["sent"] > LOST_AFTER:
                    request["error"] = "no reply within 1 s"
                    sel.unregister(s)
                    s.close()
                    del pending[s]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LOST_AFTER + 5)

    def lost(self, since: float = 0.0) -> list[dict]:
        """Requests sent since `since` known lost (the ones still waiting are not)."""
        return [r for r in self.requests if r["sent"] >= since and r["error"] is not None]


@pytest.fixture
def clients():
    started: list[UdpClients] = []

    def start(vip: str) -> UdpClients:
        started.append(UdpClients(vip))
        return started[-1]
    yield start
    for c in started:
        c.stop()


def service_backend(daemon, family: int, backend) -> dict:
    key = endpoint(backend.address(family), backend.port)
    [row] = [b for s in daemon.status()["services"] if s["name"] == f"udp{family}"
             for b in s["backends"] if b["endpoint"] == key]
    return row


def first_weight(row: dict, weight_is, after: float) -> float | None:
    return next((t for t, w in row["weight_history"] if t >= after and weight_is(w)), None)


def fault_and_repair(daemon, clients, topo, family: int, backend, fault: str) -> dict:
    """Clients running, `backend` of the family's service broken with `fault`, taken out,
    repaired, back in rotation. Returns the timings and the requests lost."""
    wait_for(lambda: service_backend(daemon, family, backend)["state"] == "healthy", 90, "the backend healthy")
    c = clients(VIPS[family])
    time.sleep(1.5)  # counters and replies flowing on every backend
    assert c.lost() == [], f"requests lost before the fault: {c.lost()}"
    fault_at = time.monotonic()
    backend.set_udp(fault)
    out_at = wait_for(lambda: first_weight(service_backend(daemon, family, backend), lambda w: w == 0, fault_at),
                      15, f"{backend.name} ({fault}) at weight 0")
    repaired_at = time.monotonic()
    backend.set_udp("serve")
    back_at = wait_for(lambda: first_weight(service_backend(daemon, family, backend), lambda w: w > 0,
                                            repaired_at), 20, f"{backend.name} back in rotation")
    time.sleep(0.5)  # a few requests after its return
    c.stop()  # every request answered, or lost
    lost = [r for r in c.lost(since=fault_at) if r["sent"] < repaired_at]
    result = {"out": round(out_at - fault_at, 3), "lost": len(lost), "back": round(back_at - repaired_at, 3),
              "lost_detail": [(round(r["sent"] - fault_at, 3), r["error"]) for r in lost],
              "requests": len(c.requests), "lost_after_repair": len(c.lost(since=repaired_at))}
    print(f"IPv{family} {fault}: {result}")
    return result


@pytest.mark.parametrize("family", families())
def test_a_backend_whose_listener_is_gone_is_out_within_1s_with_at_most_2_lost_requests(
        udp_daemon, clients, _session_topology, family):
    r = fault_and_repair(udp_daemon, clients, _session_topology, family, _session_topology.backends[0], "close")
    assert r["out"] <= 1.0, r
    assert r["lost"] <= 2, r
    assert r["lost_after_repair"] == 0, r


@pytest.mark.parametrize("family", [4, 6])
def test_a_backend_that_stops_answering_is_out_within_the_reply_window_and_one_probe(
        udp_daemon, clients, _session_topology, family):
    assert "UDP replies: counted by the tracer" in udp_daemon.log()
    r = fault_and_repair(udp_daemon, clients, _session_topology, family, _session_topology.backends[1], "silent")
    # The tracer counts packets as IPVS forwards them. The reading after the fault may still
    # see the backend's last reply; the next one sees a request go out unanswered and starts
    # the reply window. Then the window, then one probe.
    seen = 2 * DEFAULTS.udp_reply_window / STEPS
    bound = seen + DEFAULTS.udp_reply_window + UDP_PROBE_TIMEOUT
    assert r["out"] <= bound + 0.2, (bound, r)  # 0.2: the daemon's own work under emulation
    assert r["lost_after_repair"] == 0, r
