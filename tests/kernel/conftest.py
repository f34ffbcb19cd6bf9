"""Fixtures for tests that run inside a VM on a real Debian kernel (testbed/run_vm.py)."""
from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.kernel import topology

IPVS_MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_wlc", "ip_vs_lc", "ip_vs_sh", "ip_vs_mh")


# Daemon features whose kernel side is only IPVS weights and plain sockets (drain, probe
# types, hooks) run on the newest test-bed kernel alone, for CI's time budget
# (docs/development.md); the tracer and health tests run on every kernel.
ONE_KERNEL = "6.12."


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0 or not Path("/proc/sys/net/ipv4").exists() or os.environ.get("IPVSLB_IN_VM") is None:
        skip = pytest.mark.skip(reason="kernel tests run inside a VM: make test-kernel")
        for item in items:
            item.add_marker(skip)
    elif not os.uname().release.startswith(ONE_KERNEL):
        skip = pytest.mark.skip(reason=f"not kernel-dependent: runs on {ONE_KERNEL.rstrip('.')} only")
        for item in items:
            if "one_kernel" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ipvs():
    """IPVS and its schedulers loaded, with the sysctls a client-side balancer needs."""
    # Tests hold thousands of sockets open; backends inherit the limit when they start.
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    for module in IPVS_MODULES:
        topology.sh("modprobe", module)
    # Locally originated connections through masq need conntrack to find their way back.
    topology.sysctl("net.ipv4.vs.conntrack", 1)
    yield
    topology.sh("ipvsadm", "-C", check=False)


@pytest.fixture(scope="session")
def _session_topology(ipvs):
    topo = topology.build(3)
    yield topo
    topo.teardown()


@pytest.fixture
def topo(_session_topology):
    """Three backends, all accepting, and no IPVS services left over from other tests."""
    _session_topology.reset()
    topology.sh("ipvsadm", "-C")
    yield _session_topology
    topology.sh("ipvsadm", "-C")
    _session_topology.reset()


class ConnectFailed(Exception):
    def __init__(self, err: int, elapsed: float):
        super().__init__(f"{errno.errorcode.get(err, err)} after {elapsed * 1000:.0f} ms")
        self.errno = err
        self.elapsed = elapsed


def connect(host: str, port: int, timeout: float = 3.0,
            client_port: int = 0) -> tuple[str, socket.socket, float]:
    """Connect to host:port (from client_port if given); return (backend name it greets with,
    socket, connect time)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if client_port:
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", client_port))
    started = time.monotonic()
    err = s.connect_ex((host, port))
    elapsed = time.monotonic() - started
    if err:
        s.close()
        raise ConnectFailed(err, elapsed)
    name = s.makefile("rb").readline().strip().decode()
    return name, s, elapsed


def udp_ask(host: str, port: int, payload: bytes = b"ping", timeout: float = 2.0) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, (host, port))
        data, _ = s.recvfrom(65535)
    name, _, echoed = data.partition(b" ")
    assert echoed == payload
    return name.decode()


def ipvsadm(*args: str) -> str:
    return subprocess.run(["ipvsadm", *args], check=True, capture_output=True, text=True).stdout


SMOKE_BPF = r"""
#include <uapi/linux/ptrace.h>
struct smoke_event { u64 ts; u32 kind; u16 port; u16 sport; };
BPF_RINGBUF_OUTPUT(events, 8);

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    struct smoke_event e = {bpf_ktime_get_ns(), 1, args->dport, args->sport};
    events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}

int kprobe__ip_vs_conn_new(struct pt_regs *ctx, void *param, int dest_af, void *daddr, u16 dport) {
    struct smoke_event e = {bpf_ktime_get_ns(), 2, bpf_ntohs(dport), 0};
    events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""


class SmokeProbe:
    """tcp:tcp_retransmit_skb and a kprobe on ip_vs_conn_new, read through a ring buffer."""

    KINDS = {1: "retransmit", 2: "conn_new"}

    def __init__(self):
        from bcc import BPF

        started = time.monotonic()
        self.bpf = BPF(text=SMOKE_BPF.encode())
        self.compile_seconds = time.monotonic() - started
        self.events: list[tuple[str, float, int]] = []
        self.bpf["events"].open_ring_buffer(self._on_event)

    def _on_event(self, ctx, data, size):
        e = self.bpf["events"].event(data)
        self.events.append((self.KINDS[e.kind], e.ts / 1e9, e.port, e.sport))

    def drain(self, since: float, sport: int | None = None) -> list[tuple[str, float, int]]:
        """(kind, time, port) since `since`; with `sport`, only that client socket's retransmits
        (connects left over from earlier tests may still be retransmitting to the same VIP)."""
        self.bpf.ring_buffer_consume()
        return [e[:3] for e in self.events if e[1] >= since and (sport is None or e[3] == sport)]


@pytest.fixture(scope="session")
def retransmit_probe(ipvs):
    probe = SmokeProbe()
    print(f"bcc compiled and attached the smoke program in {probe.compile_seconds:.1f} s")
    yield probe
    probe.bpf.cleanup()


@pytest.fixture(scope="session")
def tracer(ipvs):
    """The product's tracer, compiled once per VM run with a small capacity so that the
    bound on tracked connections can be exercised."""
    from ipvslb.model import TracerSettings
    from ipvslb.tracer import Tracer

    t = Tracer(TracerSettings(connection_capacity=1024, ring_buffer_pages=256, report_closed=True,
                              sample_interval=0.0))
    print(f"tracer compiled and attached in {t.compile_seconds:.1f} s ({t.attribution})")
    yield t
    t.close()


@pytest.fixture(scope="module")
def daemon(_session_topology):
    """`ipvslb run` over the three backends (service `web`, daemonproc.VIP), one per module."""
    from tests.kernel.daemonproc import running, write_config

    topo = _session_topology
    topo.reset()
    with running(write_config(topo.backends)) as d:
        yield d
    topo.reset()


@pytest.fixture
def fresh(daemon, _session_topology):
    """All backends accepting, back at full weight and out of probation (where one failure
    re-quarantines at once, a path no test means to measure by accident) before the test."""
    from tests.kernel.daemonproc import wait_for

    _session_topology.reset()
    wait_for(lambda: all(b["state"] == "healthy" and b["weight"] == b["configured_weight"]
                         and b["probation_until"] is None
                         for b in daemon.backends().values()), 90, "every backend healthy, out of probation")
    return daemon


@pytest.fixture
def clients():
    """Starts client loops through the VIP, and stops each when its test ends, passed or
    failed: a loop left running after a failed assertion would load, and fail, every later
    test in the module (it once cost CI four failures for one)."""
    from tests.kernel.client import ClientLoop
    from tests.kernel.daemonproc import PORT, VIP

    started: list[ClientLoop] = []

    def start(rate: int = 50, timeout: float = 3) -> ClientLoop:
        loop = ClientLoop(VIP, PORT, rate=rate, timeout=timeout)
        loop.start()
        started.append(loop)
        return loop

    yield start
    for loop in started:
        loop.stop()
