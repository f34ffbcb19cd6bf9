#!/usr/bin/env python3
"""Benchmark (not a test): short TCP connects through a VIP with and without the tracer.

Runs inside a VM (it needs IPVS and BPF):
    testbed/run_vm.py --kernels 6.12 --exec "python3 bench/tracer_overhead.py"

A separate client process makes the connects while this process consumes the tracer's
records, as the daemon would. The tracer is compiled once; its hooks are detached and re-attached between rounds so that
"with" and "without" alternate in one run on the same machine (this host is noisy).
"""
from __future__ import annotations

import ipaddress
import multiprocessing
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipvslb.model import TracerSettings  # noqa: E402
from ipvslb.tracer import KPROBE, Tracer  # noqa: E402
from tests.kernel import topology  # noqa: E402

VIP, PORT, ROUNDS, SECONDS = "10.90.0.1", 80, 3, 5.0
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


def connect_rate(seconds: float, tracer: Tracer | None, consume: bool = True) -> tuple[float, int]:
    """Connects/s of a client process; meanwhile this process consumes records as the daemon would."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    client = multiprocessing.Process(target=client_loop, args=(seconds, sender))
    client.start()
    events = 0
    while client.is_alive():
        if tracer and consume:
            events += len(tracer.read(timeout_ms=100))
        else:
            client.join(0.1)
    client.join()
    if tracer:
        events += len(tracer.read(timeout_ms=50))
    return receiver.recv(), events


def set_attached(tracer: Tracer, attached: bool) -> None:
    for tp, fn in TRACEPOINTS:
        if attached:
            tracer.bpf.attach_tracepoint(tp=tp, fn_name=fn)
        else:
            tracer.bpf.detach_tracepoint(tp)
    if attached:
        tracer.bpf.attach_kprobe(event=KPROBE, fn_name=b"trace_ip_vs_conn_new")
    else:
        tracer.bpf.detach_kprobe(event=KPROBE)


def main() -> None:
    for module in ("ip_vs", "ip_vs_rr"):
        topology.sh("modprobe", module)
    topology.sysctl("net.ipv4.vs.conntrack", 1)
    topo = topology.build(3, prefix="bench")
    topo.add_vip(VIP)
    topology.sh("ipvsadm", "-A", "-t", f"{VIP}:{PORT}", "-s", "rr")
    for b in topo.backends:
        topology.sh("ipvsadm", "-a", "-t", f"{VIP}:{PORT}", "-r", f"{b.v4}:{b.port}", "-m")
    tracer = Tracer(TracerSettings(ring_buffer_pages=4096))  # holds a round without consumer
    tracer.set_vips([("tcp", ipaddress.ip_address(VIP), PORT)])
    set_attached(tracer, False)
    rows = []
    try:
        for round_ in range(1, ROUNDS + 1):
            without, _ = connect_rate(SECONDS, None)
            set_attached(tracer, True)
            kernel_only, _ = connect_rate(SECONDS, tracer, consume=False)
            with_, events = connect_rate(SECONDS, tracer)
            set_attached(tracer, False)
            rows.append((round_, without, kernel_only, with_, events))
    finally:
        lost = tracer.lost_records()
        tracer.close()
        topology.sh("ipvsadm", "-C")
        topo.teardown()
    print(f"\nshort TCP connects through an IPVS VIP, {SECONDS:.0f} s per cell, kernel {__import__('os').uname().release}")
    print(f"{'round':>5} | {'no tracer /s':>12} | {'tracer, kernel side /s':>22} | {'ratio':>6} | "
          f"{'tracer + consumer /s':>20} | {'ratio':>6} | {'records':>7}")
    for round_, without, kernel_only, with_, events in rows:
        print(f"{round_:>5} | {without:>12.0f} | {kernel_only:>22.0f} | {kernel_only / without:>6.1%} | "
              f"{with_:>20.0f} | {with_ / without:>6.1%} | {events:>7}")
    sums = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"{'all':>5} | {sums[0] / ROUNDS:>12.0f} | {sums[1] / ROUNDS:>22.0f} | {sums[1] / sums[0]:>6.1%} | "
          f"{sums[2] / ROUNDS:>20.0f} | {sums[2] / sums[0]:>6.1%} |")
    print(f"lost records: {lost}")


if __name__ == "__main__":
    main()
