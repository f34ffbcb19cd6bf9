"""The tracer's records, checked against the test's own sockets (by client port) and
against IPVS's connection table (`ipvsadm -Lnc`) as an independent oracle."""
from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvslb.tracer.records import Kind, Vip
from tests.kernel.conftest import ConnectFailed, connect, ipvsadm
from tests.kernel.test_smoke import PORT, VIP4, VIP6, add_service


@pytest.fixture
def traced(topo, tracer):
    """Topology plus a tracer that watches VIP4/VIP6 TCP and starts with nothing pending."""
    vips = [Vip("tcp", ipaddress.ip_address(VIP4), PORT), Vip("tcp", ipaddress.ip_address(VIP6), PORT)]
    tracer.set_vips(vips)
    tracer.read()
    yield tracer
    if tracer.attribution != "kprobe":
        tracer._attach_kprobe()
    tracer.read()


def records_for(tracer, client_ports: int | set[int] | None, wait: float = 0.3) -> list:
    """Records of the given client ports (None: all) seen within `wait` seconds."""
    ports = {client_ports} if isinstance(client_ports, int) else client_ports
    deadline = time.monotonic() + wait
    found = []
    while time.monotonic() < deadline:
        found += [e for e in tracer.read(timeout_ms=50) if ports is None or e.client[1] in ports]
    return found


def tracked_connections(tracer) -> int:
    """Connections the program holds in its `conns` map."""
    return sum(1 for _ in tracer.bpf[b"conns"])


def open_socket(vip: str, timeout: float = 3.0) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    return s  # not bound before connect: the port is assigned after SYN_SENT, as for real clients


def backend_of(b, vip: str) -> tuple:
    return (b.address(6 if ":" in vip else 4), b.port)


def test_connection_to_an_unmanaged_address_produces_no_record(traced, topo):
    b = topo.backends[0]
    s = open_socket(str(b.v4))
    s.connect((str(b.v4), b.port))
    port = s.getsockname()[1]
    s.close()
    assert records_for(traced, port) == []


def test_the_traced_services_follow_set_vips_even_when_two_share_a_port(traced, topo):
    """VIP4 and VIP6 share port 80: dropping one must not stop tracing the other (the
    in-kernel port filter), dropping both stops all records, adding one back resumes."""
    add_service(topo, VIP4, topo.backends[:1])
    add_service(topo, VIP6, topo.backends[:1])

    def traced_ports() -> dict[str, bool]:
        ports = {}
        for vip in (VIP4, VIP6):
            _, s, _ = connect(vip, PORT)
            ports[vip] = s.getsockname()[1]
            s.close()
        recs = records_for(traced, set(ports.values()))
        seen.append(f"ports {ports}: " + ", ".join(f"{e.kind.label} {e.client} -> {e.vip}" for e in recs))
        return {vip: any(e.client[1] == port and e.vip == (ipaddress.ip_address(vip), PORT) for e in recs)
                for vip, port in ports.items()}

    seen: list[str] = []  # for the failure message: which records made a VIP look traced
    assert traced_ports() == {VIP4: True, VIP6: True}, seen
    traced.set_vips([Vip("tcp", ipaddress.ip_address(VIP4), PORT)])
    assert traced_ports() == {VIP4: True, VIP6: False}, seen
    traced.set_vips([])
    assert traced_ports() == {VIP4: False, VIP6: False}, seen
    traced.set_vips([Vip("tcp", ipaddress.ip_address(VIP6), PORT)])
    assert traced_ports() == {VIP4: False, VIP6: True}, seen


def test_a_connect_does_not_inherit_an_entry_a_skipped_close_left_at_its_socket(traced, topo):
    """A connection stays tracked until its close is seen. When the kernel skips that run
    (see the test of a skipped ESTABLISHED) the entry stays under the socket's address, where
    the next connect starts: the same socket connecting again, or a new one in the same
    memory. Injected here: a live connection's entry copied under the address of a socket
    whose connect was refused; that socket then connects to a service the tracer does not
    watch, on the watched services' port."""
    refusing, other = topo.backends[1], topo.backends[0]
    untraced_vip = "10.90.0.9"
    add_service(topo, untraced_vip, [other])
    add_service(topo, VIP4, [refusing])
    refusing.set_mode("refuse")
    # Blocking: after a failed non-blocking connect Linux aborts the next connect() instead.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert s.connect_ex((VIP4, PORT)) != 0
    [reset] = [e for e in records_for(traced, None) if e.kind == Kind.RESET]
    refusing.set_mode("accept")
    live = open_socket(VIP4)
    live.connect((VIP4, PORT))
    [established] = [e for e in records_for(traced, live.getsockname()[1]) if e.kind == Kind.ESTABLISHED]
    conns = traced.bpf[b"conns"]
    conns[conns.Key(reset.sock)] = conns[conns.Key(established.sock)]
    s.connect((untraced_vip, PORT))  # a TCP socket may connect again after a refusal
    port = s.getsockname()[1]
    s.close()
    live.close()
    assert records_for(traced, port) == []


def test_by_default_an_established_connection_is_forgotten_and_its_close_not_reported(traced, topo):
    """report_closed off (the daemon's default): two records per connect, nothing left tracked."""
    b = topo.backends[0]
    add_service(topo, VIP4, [b])
    traced.set_report_closed(False)
    try:
        tracked_before = tracked_connections(traced)  # other tests' sockets may still be open
        s = open_socket(VIP4)
        s.connect((VIP4, PORT))
        port = s.getsockname()[1]
        assert [e.kind for e in records_for(traced, port)] == [Kind.CONNECT, Kind.ESTABLISHED]
        assert tracked_connections(traced) == tracked_before
        s.close()
        assert records_for(traced, port) == []
    finally:
        traced.set_report_closed(True)


@pytest.mark.parametrize("vip", [VIP4, VIP6])
@pytest.mark.parametrize("attribution", ["kprobe", "conntable"])
def test_accepted_connect_is_recorded_with_its_backend(traced, topo, vip, attribution):
    if attribution == "conntable":
        traced.use_conntable()
    b = topo.backends[0]
    add_service(topo, vip, [b])
    s = open_socket(vip)
    s.connect((vip, PORT))
    port = s.getsockname()[1]
    recs = records_for(traced, port)
    s.close()
    # Without the kprobe the connect start has no client port yet, so no CONNECT record.
    expected = [Kind.CONNECT, Kind.ESTABLISHED] if attribution == "kprobe" else [Kind.ESTABLISHED]
    assert [e.kind for e in recs] == expected
    assert all(e.backend == backend_of(b, vip) for e in recs)
    established = recs[-1]
    assert established.vip == (ipaddress.ip_address(vip), PORT)
    assert 0 < established.elapsed < 0.5
    assert [e.kind for e in records_for(traced, port)] == [Kind.CLOSED]


def failed_connect(traced, topo, vip: str, attribution: str, b, mode: str, timeout: float = 3.0) -> list:
    """The records of one connect through `vip` to its one backend `b`, put in `mode`, that fails.
    A failed connect gives its port back, so every record: the test is the only client."""
    if attribution == "conntable":
        traced.use_conntable()
    add_service(topo, vip, [b])
    b.set_mode(mode)
    s = open_socket(vip, timeout)
    assert s.connect_ex((vip, PORT)) != 0
    s.close()
    return records_for(traced, None)


@pytest.mark.parametrize("vip", [VIP4, VIP6])
@pytest.mark.parametrize("attribution", ["kprobe", "conntable"])
def test_refused_connect_is_a_reset_from_its_backend_within_100ms(traced, topo, vip, attribution):
    b = topo.backends[1]
    resets = [e for e in failed_connect(traced, topo, vip, attribution, b, "refuse") if e.kind == Kind.RESET]
    assert len(resets) == 1
    assert resets[0].backend == backend_of(b, vip)
    assert resets[0].elapsed < 0.100


@pytest.mark.parametrize("vip", [VIP4, VIP6])
@pytest.mark.parametrize("attribution", ["kprobe", "conntable"])
def test_blackholed_connect_retransmits_then_closes_in_syn_sent(traced, topo, vip, attribution):
    b = topo.backends[2]
    recs = failed_connect(traced, topo, vip, attribution, b, "blackhole", timeout=1.5)
    retransmits = [e for e in recs if e.kind == Kind.SYN_RETRANSMIT]
    assert retransmits, recs
    assert retransmits[0].backend == backend_of(b, vip)
    assert retransmits[0].retransmits == 1
    assert 0.9 < retransmits[0].elapsed < 1.5
    closed = [e for e in recs if e.kind == Kind.CLOSED_SYN_SENT]
    assert len(closed) == 1 and closed[0].backend == backend_of(b, vip)


def test_a_connect_ipvs_reschedules_is_timed_again_on_its_new_backend(traced, topo):
    """A SYN blackholed by backend 0, whose weight then drops to 0: with expire_nodest_conn IPVS
    sends a later SYN retransmit to backend 1. The tracer reports the move as a second CONNECT
    (the kprobe sees no waiting connect; the next event of the socket claims the choice), and
    that resend is not counted as a retransmit against the new backend."""
    expire = Path("/proc/sys/net/ipv4/vs/expire_nodest_conn")
    before = expire.read_text()
    expire.write_text("1\n")
    try:
        _reschedule(traced, topo)
    finally:
        expire.write_text(before)


def _reschedule(traced, topo):
    moved_from, moved_to = topo.backends[0], topo.backends[1]
    target = add_service(topo, VIP4, [moved_from])
    moved_from.set_mode("blackhole")
    s = open_socket(VIP4, timeout=8.0)
    s.setblocking(False)
    assert s.connect_ex((VIP4, PORT)) != 0  # EINPROGRESS
    port = s.getsockname()[1]
    time.sleep(0.3)
    ipvsadm("-a", "-t", target, "-r", f"{moved_to.v4}:{moved_to.port}", "-m")
    ipvsadm("-e", "-t", target, "-r", f"{moved_from.v4}:{moved_from.port}", "-m", "-w", "0")
    _, writable, _ = select.select([], [s], [], 8.0)  # the retransmit at 1 s or 3 s connects
    assert writable and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    recs = records_for(traced, port, wait=0.5)
    s.close()
    kinds = [(e.kind, e.backend) for e in recs if e.kind != Kind.BACKEND]
    old, new = backend_of(moved_from, VIP4), backend_of(moved_to, VIP4)
    assert kinds[0] == (Kind.CONNECT, old), kinds
    assert (Kind.CONNECT, new) in kinds, kinds
    after_move = kinds[kinds.index((Kind.CONNECT, new)):]
    assert after_move == [(Kind.CONNECT, new), (Kind.ESTABLISHED, new)], kinds
    assert all(e.backend == old for e in recs if e.kind == Kind.SYN_RETRANSMIT)


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_every_backend_matches_the_ipvs_connection_table(traced, topo, vip):
    add_service(topo, vip, topo.backends)
    sockets = []
    for _ in range(9):
        s = open_socket(vip)
        s.connect((vip, PORT))
        sockets.append(s)
    ports = {s.getsockname()[1] for s in sockets}
    recs = records_for(traced, ports)
    oracle = {}
    for line in ipvsadm("-Lnc").splitlines()[2:]:
        fields = line.split()
        source, destination = fields[3], fields[5]
        oracle[int(source.rsplit(":", 1)[1])] = destination
    for s in sockets:
        s.close()
    backends = {e.client[1]: e.backend for e in recs if e.kind == Kind.ESTABLISHED}
    assert set(backends) == ports
    for port, (addr, bport) in backends.items():
        expected = f"[{addr}]:{bport}" if addr.version == 6 else f"{addr}:{bport}"
        assert oracle[port] == expected
    assert {addr for addr, _ in backends.values()} == {b.address(6 if ":" in vip else 4) for b in topo.backends}


def test_tracked_connections_stay_bounded_and_drain(traced, topo):
    """100 000 connects through the VIP; 1 500 held open at once against a capacity of 1 024."""
    add_service(topo, VIP4, topo.backends)
    linger0 = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, so ports recycle
    held = []
    for _ in range(1500):
        s = socket.create_connection((VIP4, PORT))
        held.append(s)
        traced.read()
    during = tracked_connections(traced)
    for s in held:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.close()
    started = time.monotonic()
    for i in range(100_000 - 1500):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.connect((VIP4, PORT))
        s.close()
        if i % 200 == 0:
            traced.read()
    rate = (100_000 - 1500) / (time.monotonic() - started)
    traced.read(timeout_ms=100)
    after = tracked_connections(traced)
    lost = traced.lost_records()
    print(f"tracked while 1500 open: {during}; after 100000 connects: {after}; lost records: {lost}; "
          f"{rate:.0f} connects/s")
    assert during <= 1024
    assert after <= 5


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_sampling_times_one_connect_per_backend_and_interval_counts_the_rest_and_reports_every_failure(
        traced, topo, vip):
    """The daemon's default: settings.tracer.sample_interval. Checked against the backend
    each connect greeted us from."""
    backends = topo.backends[:2]
    add_service(topo, vip, backends)
    family = 6 if ":" in vip else 4
    by_name = {f"b{b.index}": backend_of(b, vip) for b in backends}
    traced.set_report_closed(False)
    traced.set_sample_interval(5.0)  # longer than the test: exactly one timed connect per backend
    try:
        # A pair gets its count slot once the reader has seen a timed connect to it.
        for _ in by_name:
            connect(vip, PORT)[1].close()
        records_for(traced, None)
        assert {c.backend for c in traced.counted() if c.vip == (ipaddress.ip_address(vip), PORT)} == set(
            by_name.values())
        before = {c.backend: c.connects for c in traced.counted()}
        greeted = []
        started = time.monotonic()
        for _ in range(20):
            name, s, _ = connect(vip, PORT)
            greeted.append(by_name[name])
            s.close()
        assert time.monotonic() - started < 5.0
        recs = records_for(traced, None)
        counted = {c.backend: c.connects - before.get(c.backend, 0) for c in traced.counted()
                   if c.vip == (ipaddress.ip_address(vip), PORT)}
        for backend in by_name.values():
            timed = [e for e in recs if e.backend == backend]
            assert [e.kind for e in timed] == [Kind.CONNECT, Kind.ESTABLISHED]
            assert 1 + counted[backend] == greeted.count(backend)
        print(f"IPv{family}: 20 connects, {len(recs)} records, counted {sorted(counted.values())}")

        # Failures are reported for every connect, timed or not.
        backends[1].set_mode("refuse")
        refused = 0
        for _ in range(6):
            try:
                _, s, _ = connect(vip, PORT)
                s.close()
            except ConnectFailed:
                refused += 1
        resets = [e for e in records_for(traced, None) if e.kind == Kind.RESET]
        assert refused == 3
        assert len(resets) == refused and {e.backend for e in resets} == {by_name[f"b{backends[1].index}"]}
    finally:
        traced.set_sample_interval(0.0)
        traced.set_report_closed(True)
        backends[1].set_mode("accept")


# A second tracing program that keeps a CPU inside BPF for a while at each getppid().
# A kprobe: on 7.2 a program on the syscall tracepoint provoked no skip at all. The loop has
# no branch but its own, whose outcome the verifier knows (6.12's refused a map lookup in
# it: E2BIG), and no clock read (under TCG the clocksource watchdog may switch clocks while
# it runs, and 7.2 then oopsed in ktime_get_mono_fast_ns, which it was patching).
# Beside it, the witness: a *classic* tracepoint program counting transitions to ESTABLISHED
# of sockets connecting to PORT, which the kernel skips while any kprobe or tracepoint
# program runs on the CPU, as it skipped the tracer's own before they were attached raw.
BUSY_AND_WITNESS_PROGRAM = """
int busy(struct pt_regs *ctx) {
    volatile u64 sum = 0;
    for (int i = 0; i < 50000; i++)
        sum += i;
    return 0;
}

BPF_ARRAY(witnessed, u64, 1);
TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol == 6 && args->newstate == 1 && args->dport == PORT) {
        int zero = 0;
        u64 *n = witnessed.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
    return 0;
}
"""


def test_a_tracing_program_busy_on_every_cpu_hides_no_connect_from_the_tracer(traced, topo):
    """The tracer's tracepoints are attached raw: the kernel skips one only while the same
    program already runs on that CPU, not while any tracing program does. Provoked as the
    classic tracepoints were skipped: netem sends every SYN from a timer interrupt, and a
    kprobe program keeps every CPU busy, so SYN-ACKs arrive while it runs. A classic
    tracepoint program beside the tracer witnesses that skips happen; the tracer still
    reports every connect established. Timed, except where the kernel skipped the tracer's
    own program nested in itself (a softirq interrupting it on that CPU): that is counted
    among its skipped runs, and the close that follows reports the connect established,
    untimed."""
    from bcc import BPF

    add_service(topo, VIP4, topo.backends)
    traced.set_sample_interval(0.0)
    bpf = BPF(text=BUSY_AND_WITNESS_PROGRAM.encode(), cflags=[f"-DPORT={PORT}"])
    bpf.attach_kprobe(event=bpf.get_syscall_fnname(b"getppid"), fn_name=b"busy")
    witnessed = bpf[b"witnessed"]
    # One per CPU: the timer fires on the CPU that queued the SYN, which the client leaves idle.
    spinners = [subprocess.Popen([sys.executable, "-c", "import os\nwhile True: os.getppid()"])
                for _ in range(os.cpu_count() or 1)]
    missed_before = traced.missed_runs()
    for b in topo.backends:
        b.set_delay(50)
    succeeded, connects, recs = set(), 0, []
    try:
        stop = time.monotonic() + 40
        while time.monotonic() < stop:
            for _ in range(20):
                _, s, _ = connect(VIP4, PORT)
                succeeded.add(s.getsockname()[1])
                connects += 1
                s.close()
            recs += records_for(traced, None, wait=0.2)
            if connects - witnessed[0].value >= 3:
                break
        recs += records_for(traced, None, wait=0.5)
        witness_skipped = connects - witnessed[0].value
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        bpf.cleanup()
        for b in topo.backends:
            b.set_delay(0)
    ours = [e for e in recs if e.client[1] in succeeded]
    kinds = {kind: sum(e.kind == kind for e in ours) for kind in Kind}
    skipped = traced.missed_runs() - missed_before
    summary = (f"{connects} connects succeeded; the classic witness missed {witness_skipped}; the "
               f"tracer's skipped runs: {skipped}; records: "
               + ", ".join(f"{k.label} {n}" for k, n in kinds.items() if n))
    print(summary)
    timed = {e.client[1] for e in ours if e.kind == Kind.ESTABLISHED}
    untimed = {e.client[1] for e in ours if e.kind == Kind.ESTABLISHED_UNTIMED}
    unreported = succeeded - timed - untimed
    detail = f"{summary}; not reported established: {sorted(unreported)}; records of the " \
             f"untimed and unreported: {[e for e in recs if e.client[1] in unreported | untimed]}"
    assert witness_skipped >= 1  # the provocation works: a classic tracepoint was skipped
    assert not unreported, detail
    assert len(untimed) <= skipped, detail
    assert kinds[Kind.CLOSED_SYN_SENT] == kinds[Kind.RESET] == kinds[Kind.SYN_RETRANSMIT] == 0, detail
