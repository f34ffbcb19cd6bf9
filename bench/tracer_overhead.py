#!/usr/bin/env python3
"""Benchmark (not a test): short TCP connects through a VIP with and without the tracer.

Runs inside a VM (it needs IPVS and BPF):
    testbed/run_vm.py --kernels 6.12 --exec "python3 bench/tracer_overhead.py"

A separate client process makes the connects while this process consumes the tracer's
records, as the daemon would (reading again within the wakeup interval while records flow,
and the successes the kernel only counted). The tracer is compiled once; its hooks are
detached and re-attached between cells so that "with" and "without" alternate in one run on
the same machine (this host is noisy), and the order of the cells is reversed every other
round so that drift favours none of them.

Cells: no tracer; empty programs on the same four hooks (what attaching anything there
costs: the floor for any tracer built on them); the tracer with the daemon's settings,
kernel side only (ring buffer read after the cell); the same with the consumer; and the
consumer with every connect reported (`sample_interval: 0`, two records per connect).
"""
from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipvslb.events import CountedSince  # noqa: E402
from ipvslb.model import TracerSettings  # noqa: E402
from ipvslb.tracer import KPROBE, Tracer  # noqa: E402
from tests.kernel import topology  # noqa: E402

VIP, PORT, ROUNDS, SECONDS = "10.90.0.1", 80, 6, 4.0
# The floor: programs that return at once, on the tracer's hooks, attached the same way.
EMPTY_HOOKS = b"""
TRACEPOINT_PROBE(sock, inet_sock_set_state) { return 0; }
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) { return 0; }
TRACEPOINT_PROBE(tcp, tcp_receive_reset) { return 0; }
int trace_ip_vs_conn_new(struct pt_regs *ctx) { return 0; }
"""
TRACEPOINTS = [(b"sock:inet_sock_set_state", b"tracepoint__sock__inet_sock_set_state"),
               (b"tcp:tcp_retransmit_skb", b"tracepoint__tcp__tcp_retransmit_skb"),
               (b"tcp:tcp_receive_reset", b"tracepoint__tcp__tcp_receive_reset")]


def client_loop(seconds: float, result) -> None:
    linger0 = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, ports recycle
    count = 0
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.connect((VIP, PORT))
        s.close()
        count += 1
    result.send(count / (time.monotonic() - started))


# The client is started from a fresh interpreter, not forked from this process: with bcc and
# LLVM loaded this process is large, and copy-on-write faults after each fork would slow
# both sides for reasons that have nothing to do with tracing.
CLIENTS = multiprocessing.get_context("forkserver")


def connect_rate(seconds: float, tracer: Tracer | None, consume: bool = True) -> tuple[float, int, float]:
    """Connects/s of a client process, records read, and the CPU seconds this process spent
    reading them, consuming as the daemon would (read again within the wakeup interval while
    records flow, otherwise wait for the kernel's wakeup; read the counted successes with
    every read of the ring buffer)."""
    receiver, sender = CLIENTS.Pipe(duplex=False)
    client = CLIENTS.Process(target=client_loop, args=(seconds, sender))
    client.start()
    events, cpu = 0, 0.0
    counted = CountedSince()
    wait_ms = 100
    while client.is_alive():
        if tracer and consume:
            started = time.process_time()
            batch = tracer.read(timeout_ms=wait_ms)
            if tracer.sample_interval:
                counted.new(tracer.counted())
            cpu += time.process_time() - started
            events += len(batch)
            wait_ms = max(1, round(tracer.wakeup_interval * 1000)) if batch else 100
        else:
            client.join(0.1)
    client.join()
    if tracer:
        events += len(tracer.read(timeout_ms=50))
    return receiver.recv(), events, cpu


def bpf_run_times(tracer: Tracer) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of the tracer's BPF programs (kernel.bpf_stats_enabled).
    By program id: the floor's empty programs carry the same names."""
    ids = set()
    for function in tracer.bpf.funcs.values():
        info = Path(f"/proc/self/fdinfo/{function.fd}").read_text()
        ids |= {int(line.split()[1]) for line in info.splitlines() if line.startswith("prog_id:")}
    shown = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                                      check=True).stdout)
    return {p.get("name", "?"): (p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in shown if p["id"] in ids}


def cost_per_connect(tracer: Tracer) -> list[str]:
    """Where the tracer's CPU goes, per connect: BPF run time by program (the kernel's own
    accounting, switched on for this cell only since it adds two clock reads per run) and the
    consumer's CPU time, next to the CPU time a connect costs without the tracer."""
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    base_rate, _, _ = connect_rate(SECONDS, None)
    base_cpu_us = 2 * 1e6 / base_rate  # this VM's 2 vCPUs are busy the whole cell
    stats.write_text("1\n")
    try:
        before = bpf_run_times(tracer)
        set_attached(tracer, True)
        rate, records, consumer_s = connect_rate(SECONDS, tracer)
        set_attached(tracer, False)
        after = bpf_run_times(tracer)
    finally:
        stats.write_text("0\n")
    connects = rate * SECONDS
    out = []
    print = out.append  # noqa: A001 - collected, printed after the main table
    print(f"\nCPU per connect: {base_cpu_us:.0f} us without the tracer ({base_rate:.0f}/s on 2 vCPUs); "
          f"with it ({rate:.0f}/s, {records / connects:.2f} records per connect):")
    print("| part | runs per connect | us per connect | share of an untraced connect |")
    print("|---|---|---|---|")
    for name in sorted(after):
        ns = after[name][0] - before.get(name, (0, 0))[0]
        runs = after[name][1] - before.get(name, (0, 0))[1]
        if runs:
            print(f"| BPF {name} | {runs / connects:.2f} | {ns / 1000 / connects:.1f} | "
                  f"{ns / 1000 / connects / base_cpu_us:.1%} |")
    print(f"| consumer (ring buffer to events) | | {consumer_s * 1e6 / connects:.1f} | "
          f"{consumer_s * 1e6 / connects / base_cpu_us:.1%} |")
    return out


def set_attached(tracer, attached: bool) -> None:
    """Attach or detach a Tracer's hooks, or those of a bare bcc BPF object (the floor)."""
    bpf = getattr(tracer, "bpf", tracer)
    for tp, fn in TRACEPOINTS:
        if attached:
            bpf.attach_tracepoint(tp=tp, fn_name=fn)
        else:
            bpf.detach_tracepoint(tp)
    if attached:
        bpf.attach_kprobe(event=KPROBE, fn_name=b"trace_ip_vs_conn_new")
    else:
        bpf.detach_kprobe(event=KPROBE)


def main() -> None:
    for module in ("ip_vs", "ip_vs_rr"):
        topology.sh("modprobe", module)
    topology.sysctl("net.ipv4.vs.conntrack", 1)
    topo = topology.build(3, prefix="bench")
    topo.add_vip(VIP)
    topology.sh("ipvsadm", "-A", "-t", f"{VIP}:{PORT}", "-s", "rr")
    for b in topo.backends:
        topology.sh("ipvsadm", "-a", "-t", f"{VIP}:{PORT}", "-r", f"{b.v4}:{b.port}", "-m")
    from bcc import BPF

    # The daemon's settings, with a ring buffer that holds a whole cell without a consumer.
    defaults = TracerSettings()
    tracer = Tracer(TracerSettings(ring_buffer_pages=4096))
    tracer.set_vips([("tcp", ipaddress.ip_address(VIP), PORT)])
    set_attached(tracer, False)
    empty = BPF(text=EMPTY_HOOKS)  # bcc attaches the tracepoints; the kprobe, like the tracer's, by name
    empty.attach_kprobe(event=KPROBE, fn_name=b"trace_ip_vs_conn_new")
    set_attached(empty, False)
    rows = []

    def untraced() -> tuple[float, int, float]:
        return connect_rate(SECONDS, None)

    def floor() -> tuple[float, int, float]:
        set_attached(empty, True)
        try:
            return connect_rate(SECONDS, None)
        finally:
            set_attached(empty, False)

    def traced(consume: bool, sample_interval: float = defaults.sample_interval) -> tuple[float, int, float]:
        tracer.set_sample_interval(sample_interval)
        set_attached(tracer, True)
        try:
            return connect_rate(SECONDS, tracer, consume)
        finally:
            set_attached(tracer, False)
            tracer.read()

    # no tracer | empty hooks | kernel side | tracer + consumer | every connect reported
    cells = [untraced, floor, lambda: traced(False), lambda: traced(True), lambda: traced(True, 0.0)]
    try:
        for round_ in range(1, ROUNDS + 1):
            order = range(len(cells)) if round_ % 2 else reversed(range(len(cells)))
            measured = {i: cells[i]() for i in order}
            rows.append((round_, *(measured[i][0] for i in range(len(cells))), measured[3][1],
                         measured[4][1]))
        tracer.set_sample_interval(defaults.sample_interval)
        costs = cost_per_connect(tracer)
    finally:
        lost = tracer.lost_records()
        skipped = tracer.missed_runs()
        counted = sum(c.count for c in tracer.counted())
        tracer.close()
        empty.cleanup()
        topology.sh("ipvsadm", "-C")
        topo.teardown()
    print(f"\nshort TCP connects through an IPVS VIP, {SECONDS:.0f} s per cell, kernel {os.uname().release}, "
          f"wakeup interval {defaults.wakeup_interval * 1000:g} ms, sample interval "
          f"{defaults.sample_interval * 1000:g} ms")
    heads = ["no tracer /s", "empty hooks /s", "ratio", "tracer, kernel side /s", "ratio",
             "tracer + consumer /s", "ratio", "every connect reported /s", "ratio", "records (sampled / every)"]
    print("| round | " + " | ".join(heads) + " |")
    print("|---" * (len(heads) + 1) + "|")

    def line(label: str, base: float, *traced_rates: float, extra: str) -> None:
        cells_ = "".join(f" {rate:.0f} | {rate / base:.1%} |" for rate in traced_rates)
        print(f"| {label} | {base:.0f} |{cells_} {extra} |")

    for round_, base, *rates, sampled, every in rows:
        line(str(round_), base, *rates, extra=f"{sampled} / {every}")
    means = [sum(r[i] for r in rows) / len(rows) for i in range(1, len(cells) + 1)]
    line("mean", *means, extra="")
    print(f"lost records: {lost}; tracer runs the kernel skipped (recursion_misses): {skipped}; "
          f"connects counted in the kernel without records: {counted}")
    print("\n".join(costs))


if __name__ == "__main__":
    main()
