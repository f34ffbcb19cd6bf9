#!/usr/bin/env python3
"""Benchmark (not a test): short TCP connects through a VIP with and without the tracer.

Runs inside a VM (it needs IPVS and BPF). `make bench-tracer` runs it on one vCPU whose clock
counts instructions (QEMU `-icount`, 1 ns each), so the figures do not move with the host's
load (docs/benchmarks.md, "Tracer overhead", for shift=3, 8 ns each):
    testbed/run_vm.py --kernels 6.12 --qemu-opts "-icount shift=0,sleep=off -smp 1" \
        --exec "python3 bench/tracer_overhead.py --cycles 10"
In wall-clock time on 2 vCPUs instead (noisy here: slices swing by ±20 %):
    testbed/run_vm.py --kernels 6.12 --exec "python3 bench/tracer_overhead.py"
    testbed/run_vm.py --kernels 6.12 --exec "python3 bench/tracer_overhead.py --clients 2"

Client processes connect through a 3-backend VIP without pause for the whole run, each one
connect at a time (connect, then close with RST), and count their connects in shared memory.
Meanwhile this process switches between the cells in short slices and reads the count at
each slice's edges. The tracer is compiled once; switching a cell is attaching or detaching
its hooks. In wall-clock time this host is noisy (QEMU TCG on a shared machine: the rate drifts by
±10 % within seconds), so each cycle runs every cell once, in a slice of about a second, and a cell's
figure is the mean over cycles of its rate divided by the untraced rate of the same cycle.
The order of the cells is reversed every other cycle so that drift favours none of them.

Cells: no tracer; empty programs on the same four hooks (what attaching anything there
costs: the floor for any tracer built on them); the tracer with the daemon's settings,
kernel side only (ring buffer read after the slice); the same with the consumer, reading as
the daemon does; and the consumer with every connect reported (`sample_interval: 0`, two
records per connect).

With one client (the default) each connect waits for the previous one, so the ratio says
how much longer a connect takes. With `--clients 2` two clients compete with the backends
for the 2 vCPUs (the total rate is lower than with one), so the ratio says how much CPU the
tracer takes from a saturated host. On one vCPU a connect's time is all the CPU work it
takes, the backends' included.

Each cell also reports context switches per connect (/proc/stat): the tracer's work lengthens
the client's turns on the CPU, and the scheduler then switches more often between the client
and the backends, a cost that shows in no BPF program's run time.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import multiprocessing
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipvslb.model import TracerSettings  # noqa: E402
from ipvslb.tracer.loader import KPROBE, Tracer  # noqa: E402
from ipvslb.tracer.records import CountedSince  # noqa: E402
from tests.kernel import topology  # noqa: E402

VIP, PORT = "10.90.0.1", 80
# The floor: programs that return at once, on the tracer's hooks, attached the same way.
EMPTY_HOOKS = b"""
RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }
RAW_TRACEPOINT_PROBE(tcp_retransmit_skb) { return 0; }
RAW_TRACEPOINT_PROBE(tcp_receive_reset) { return 0; }
int trace_ip_vs_conn_new(struct pt_regs *ctx) { return 0; }
"""
TRACEPOINTS = [b"inet_sock_set_state", b"tcp_retransmit_skb", b"tcp_receive_reset"]  # attached raw


def client_loop(count, pause, paused) -> None:
    linger0 = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, ports recycle
    while pause.value != STOP:
        if pause.value:
            paused.value = 1
            while pause.value == PAUSE:
                time.sleep(0.001)
            paused.value = 0
            continue
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.connect((VIP, PORT))
        s.close()
        count.value += 1


# Clients are started from a fresh interpreter, not forked from this process: with bcc and
# LLVM loaded this process is large, and copy-on-write faults after each fork would slow
# both sides for reasons that have nothing to do with tracing.
CLIENTS = multiprocessing.get_context("forkserver")


RUN, PAUSE, STOP = 0, 1, 2


class Clients:
    """Client processes that connect until stopped; `connects()` is their total so far.

    They pause while a cell's hooks are attached or detached. Both patch kernel text the
    clients run through (the tracepoints' jumps, the kprobe's call), and under QEMU's
    emulation a vCPU can run the old bytes of code patched under its feet: the guest then
    dies of an int3 in inet_sk_state_store (seen twice in 300 switches with the clients
    running, on 6.12). Real hardware serializes this; the emulator we run on does not."""

    def __init__(self, n: int) -> None:
        self.pause = CLIENTS.RawValue("B", RUN)
        self.counts = [CLIENTS.RawValue("Q", 0) for _ in range(n)]
        self.paused = [CLIENTS.RawValue("B", 0) for _ in range(n)]
        self.procs = [CLIENTS.Process(target=client_loop, args=(c, self.pause, p))
                      for c, p in zip(self.counts, self.paused, strict=True)]
        for p in self.procs:
            p.start()
        deadline = time.monotonic() + 120  # a fresh interpreter starts slowly under emulation
        while not all(c.value for c in self.counts):
            if time.monotonic() > deadline or not all(p.is_alive() for p in self.procs):
                raise RuntimeError("the client processes did not start connecting")
            time.sleep(0.1)

    def connects(self) -> int:
        return sum(c.value for c in self.counts)

    @contextlib.contextmanager
    def paused_while(self):
        """No client connecting, and the backends' last packets handled, for the block."""
        self.pause.value = PAUSE
        while not all(p.value for p in self.paused):
            if not all(p.is_alive() for p in self.procs):
                raise RuntimeError("a client process died (its traceback is above)")
            time.sleep(0.001)
        time.sleep(0.02)
        try:
            yield
        finally:
            self.pause.value = RUN

    def close(self) -> None:
        self.pause.value = STOP
        for p in self.procs:
            p.join(10)


def set_attached(tracer, attached: bool) -> None:
    """Attach or detach a Tracer's hooks, or those of a bare bcc BPF object (the floor)."""
    bpf = getattr(tracer, "bpf", tracer)
    for tp in TRACEPOINTS:
        if attached:
            bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
        else:
            bpf.detach_raw_tracepoint(tp=tp)
    if attached:
        bpf.attach_kprobe(event=KPROBE, fn_name=b"trace_ip_vs_conn_new")
    else:
        bpf.detach_kprobe(event=KPROBE)


@dataclass
class Cell:
    name: str
    hooks: object = None             # a Tracer or bcc BPF object whose hooks the cell attaches
    consumer: Tracer | None = None   # read as the daemon does during the slice
    before: Callable[[], None] = lambda: None
    rates: list[float] = field(default_factory=list)
    records: int = 0
    connects: int = 0
    switches: int = 0
    consumer_cpu: float = 0.0


def consume_until(tracer: Tracer, deadline: float, counted: CountedSince) -> tuple[int, float]:
    """Read as the daemon does until the deadline: again within the wakeup interval while
    records flow, otherwise wait for the kernel's wakeup; the counted successes with every
    read. Returns records read and the CPU seconds the reads took."""
    records, cpu, wait_ms = 0, 0.0, 100
    while (left := deadline - time.monotonic()) > 0:
        started = time.process_time()
        batch = tracer.read(timeout_ms=max(1, min(wait_ms, round(left * 1000))))
        if tracer.sample_interval:
            counted.new(tracer.counted())
        cpu += time.process_time() - started
        records += len(batch)
        wait_ms = max(1, round(tracer.wakeup_interval * 1000)) if batch else 100
    return records, cpu


def wait_until(cell: Cell, deadline: float, counted: CountedSince) -> tuple[int, float]:
    if cell.consumer:
        return consume_until(cell.consumer, deadline, counted)
    time.sleep(max(0.0, deadline - time.monotonic()))
    return 0, 0.0


def context_switches() -> int:
    """Context switches on all CPUs since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    raise RuntimeError("no ctxt line in /proc/stat")


def run_slice(cell: Cell, clients: Clients, settle: float, seconds: float) -> float:
    """The clients' connect rate while the cell is in place, from `settle` after it was put
    in place (attaching patches kernel text and opens perf events) for `seconds`."""
    cell.before()
    if cell.hooks is not None:
        with clients.paused_while():
            set_attached(cell.hooks, True)
    counted = CountedSince()
    try:
        wait_until(cell, time.monotonic() + settle, counted)
        s0, c0, t0 = context_switches(), clients.connects(), time.monotonic()
        records, cpu = wait_until(cell, t0 + seconds, counted)
        c1, t1, s1 = clients.connects(), time.monotonic(), context_switches()
    finally:
        if cell.hooks is not None:
            with clients.paused_while():
                set_attached(cell.hooks, False)
    cell.records += records
    cell.connects += c1 - c0
    cell.switches += s1 - s0
    cell.consumer_cpu += cpu
    return (c1 - c0) / (t1 - t0)


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


def cost_per_connect(tracer: Tracer, clients: Clients, settle: float) -> list[str]:
    """Where the tracer's CPU goes, per connect: BPF run time by program (the kernel's own
    accounting, switched on for this cell only since it adds two clock reads per run) and the
    consumer's CPU time, next to the CPU time a connect costs without the tracer."""
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    seconds = 4.0
    base_rate = run_slice(Cell("none"), clients, settle, seconds)
    base_cpu_us = os.cpu_count() * 1e6 / base_rate  # the clients and their backends keep every vCPU busy
    traced = Cell("traced", hooks=tracer, consumer=tracer)
    with clients.paused_while():  # a static key: patched kernel text, like attaching
        stats.write_text("1\n")
    try:
        before = bpf_run_times(tracer)
        rate = run_slice(traced, clients, settle, seconds)
        after = bpf_run_times(tracer)
    finally:
        with clients.paused_while():
            stats.write_text("0\n")
    out = [f"\nCPU per connect: {base_cpu_us:.0f} us without the tracer ({base_rate:.0f}/s on {os.cpu_count()} "
           f"vCPUs); with it ({rate:.0f}/s, {traced.records / traced.connects:.2f} records per connect):",
           "| part | runs per connect | us per connect | share of an untraced connect |",
           "|---|---|---|---|"]
    # The BPF counters also ran during the settling time: scale by connects over the whole span.
    span_connects = rate * (seconds + settle)
    for name in sorted(after):
        ns = after[name][0] - before.get(name, (0, 0))[0]
        runs = after[name][1] - before.get(name, (0, 0))[1]
        if runs:
            out.append(f"| BPF {name} | {runs / span_connects:.2f} | {ns / 1000 / span_connects:.1f} | "
                       f"{ns / 1000 / span_connects / base_cpu_us:.1%} |")
    per_connect = traced.consumer_cpu * 1e6 / traced.connects
    out.append(f"| consumer (ring buffer and counts to events) | | {per_connect:.1f} | "
               f"{per_connect / base_cpu_us:.1%} |")
    return out


def mean_and_margin(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its ~95 % confidence interval (2 standard errors)."""
    if len(values) < 2:
        return values[0], math.nan
    return statistics.fmean(values), 2 * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes connecting at once (default 1: how much longer a connect "
                             "takes; 2 on this 2-vCPU VM: how much CPU the tracer takes from a saturated host)")
    parser.add_argument("--cycles", type=int, default=30, help="cycles of all cells (default 30)")
    parser.add_argument("--slice", type=float, default=1.0, help="seconds measured per cell and cycle (default 1)")
    parser.add_argument("--settle", type=float, default=0.25,
                        help="seconds after switching a cell before measuring (default 0.25)")
    args = parser.parse_args()

    for module in ("ip_vs", "ip_vs_rr"):
        topology.sh("modprobe", module)
    topology.sysctl("net.ipv4.vs.conntrack", 1)
    topo = topology.build(3, prefix="bench")
    topo.add_vip(VIP)
    topology.sh("ipvsadm", "-A", "-t", f"{VIP}:{PORT}", "-s", "rr")
    for b in topo.backends:
        topology.sh("ipvsadm", "-a", "-t", f"{VIP}:{PORT}", "-r", f"{b.v4}:{b.port}", "-m")
    from bcc import BPF

    # The daemon's settings, with a ring buffer that holds a slice's records without a consumer.
    defaults = TracerSettings()
    tracer = Tracer(TracerSettings(ring_buffer_pages=4096))
    tracer.set_vips([("tcp", ipaddress.ip_address(VIP), PORT)])
    set_attached(tracer, False)
    empty = BPF(text=EMPTY_HOOKS)  # bcc attaches the tracepoints; the kprobe, like the tracer's, by name
    empty.attach_kprobe(event=KPROBE, fn_name=b"trace_ip_vs_conn_new")
    set_attached(empty, False)

    def sampled() -> None:
        tracer.set_sample_interval(defaults.sample_interval)

    def every() -> None:
        tracer.set_sample_interval(0.0)

    cells = [Cell("no tracer"), Cell("empty hooks", hooks=empty),
             Cell("tracer, kernel side", hooks=tracer, before=sampled),
             Cell("tracer + consumer", hooks=tracer, consumer=tracer, before=sampled),
             Cell("every connect reported", hooks=tracer, consumer=tracer, before=every)]
    clients = Clients(args.clients)
    started = time.monotonic()
    try:
        for cycle in range(args.cycles):
            for cell in cells if cycle % 2 == 0 else reversed(cells):
                cell.rates.append(run_slice(cell, clients, args.settle, args.slice))
                tracer.read()  # the kernel-side cell's records, so that the next slice starts empty
        sampled()
        costs = cost_per_connect(tracer, clients, args.settle)
    finally:
        clients.close()
        lost = tracer.lost_records()
        skipped = tracer.missed_runs()
        counted = sum(c.connects for c in tracer.counted())
        tracer.close()
        empty.cleanup()
        topology.sh("ipvsadm", "-C")
        topo.teardown()

    base = cells[0].rates
    print(f"\nshort TCP connects through an IPVS VIP (3 backends), {args.clients} client(s), "
          f"{os.cpu_count()} vCPU(s), kernel {os.uname().release}; {args.cycles} cycles of {len(cells)} cells, "
          f"{args.slice:g} s measured per "
          f"cell and cycle ({args.settle:g} s settling); {time.monotonic() - started:.0f} s in all; wakeup "
          f"interval {defaults.wakeup_interval * 1000:g} ms, sample interval {defaults.sample_interval * 1000:g} ms")
    print("| cell | connects/s (mean) | of the untraced rate: mean ± 2 s.e. | median | middle half of cycles "
          "| records per connect | context switches per connect |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cell in cells:
        ratios = [r / b for r, b in zip(cell.rates, base, strict=True)]
        mean, margin = mean_and_margin(ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        records = f"{cell.records / cell.connects:.2f}" if cell.consumer else ""
        print(f"| {cell.name} | {statistics.fmean(cell.rates):.0f} | {mean:.1%} ± {margin:.1%} | "
              f"{quartiles[1]:.1%} | {quartiles[0]:.1%}–{quartiles[2]:.1%} | {records} | "
              f"{cell.switches / cell.connects:.2f} |")
    print("\nconnects/s per cycle (" + ", ".join(cell.name for cell in cells) + "):")
    for cycle in range(args.cycles):
        print(f"  {cycle + 1:3d}: " + " ".join(f"{cell.rates[cycle]:5.0f}" for cell in cells))
    print(f"lost records: {lost}; tracer runs the kernel skipped (recursion_misses): {skipped}; "
          f"connects counted in the kernel without records: {counted}")
    print("\n".join(costs))


if __name__ == "__main__":
    main()
