#!/usr/bin/env python3
"""Benchmark (not a test): what a reload costs the daemon and the clients, with many services.

Runs inside one VM (it needs IPVS and BPF):
    testbed/run_vm.py --kernels 6.12 --exec "python3 bench/reload_cost.py"

`ipvslb run` with SERVICES TCP services (each over the same three backends in network
namespaces, weight 10), a client making 50 connects/s (3 s connect timeout) to the first
service. Two runs of RUN seconds each with the same daemon: one without reloads, then one
with a SIGHUP every second, the configuration file alternating between SERVICES services
and SERVICES + 1 (one service added, then removed again).

The CPU of a reload is measured around it: the daemon's CPU time (the sum of its threads'
run time in /proc/<pid>/task/*/schedstat, in nanoseconds) from just before the SIGHUP to
the log line that ends the reload, less what the daemon spends anyway in that time (its
CPU per second in the run without reloads: evidence of 50 connects/s). The bench waits for
that line by reading the log file, so it asks the daemon nothing meanwhile. The table gives
the median, mean and largest CPU per reload, the daemon's CPU over each whole run, its RSS
at the end, and the client's connect times.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipvslb import status  # noqa: E402
from ipvslb.snapshot import StatusSnapshot  # noqa: E402
from tests.kernel import topology  # noqa: E402
from tests.kernel.client import ClientLoop  # noqa: E402

SERVICES = int(os.environ.get("SERVICES", 200))
RUN = float(os.environ.get("RUN_SECONDS", 30))
RELOAD_INTERVAL = 1.0
WEIGHT = 10
SLOW = 0.5
SOCKET = "/run/ipvslb-bench.sock"


def vip(i: int) -> str:
    return f"10.93.{i // 250}.{i % 250 + 1}"


def config_text(workdir: Path, backends, services: int) -> str:
    lines = [
        "settings:",
        f"  state_dir: {workdir}/state",
        f"  status_socket: {SOCKET}",
        "  metrics_address: 127.0.0.1:9743",
        "services:",
    ]
    for i in range(services):
        lines += [
            f"  - name: svc{i}",
            f"    vip: {vip(i)}",
            "    port: 80",
            "    scheduler: rr",
            "    backends:",
            *[f"      - {{address: {b.v4}, port: {b.port}, weight: {WEIGHT}}}" for b in backends],
        ]
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float:
    """The run time of the daemon's threads so far (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just ended
    return total / 1e9


class LogWatch:
    """Counts the daemon's lines that end a reload, read from its log file as it grows."""

    ENDS = ("reloaded ", "reload refused", "reload failed")

    def __init__(self, path: Path):
        self.file = path.open()
        self.file.seek(0, os.SEEK_END)
        self.partial = ""
        self.ended = 0

    def wait_for(self, count: int, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while self.ended < count:
            text = self.partial + self.file.read()
            *lines, self.partial = text.split("\n")
            self.ended += sum(any(end in line for end in self.ENDS) for line in lines)
            if self.ended >= count:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_healthy(proc: subprocess.Popen, services: int, timeout: float = 600) -> StatusSnapshot:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the daemon exited; see its log")
        if Path(SOCKET).exists():
            snap = status.fetch_snapshot(SOCKET)
            rows = [b for s in snap.services for b in s.backends]
            if (len(snap.services) == services
                    and all(b.state == "healthy" and b.weight == WEIGHT for b in rows)):
                return snap
        time.sleep(0.5)
    raise RuntimeError(f"the daemon did not bring up {services} services within {timeout:.0f} s")


def run(proc: subprocess.Popen, config: Path, log: Path, texts: list[str] | None, idle_rate: float = 0.0) -> dict:
    """One RUN-second run of the client; with `texts`, a reload every second, the file
    cycling through them, each reload's CPU measured around it."""
    before = status.fetch_snapshot(SOCKET).reloads
    watch = LogWatch(log)
    client = ClientLoop(vip(0), 80)
    cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
    client.start()
    sent, costs, walls = 0, [], []
    while time.monotonic() - t0 < RUN:
        if texts:
            config.write_text(texts[sent % len(texts)])
            c, w = cpu_seconds(proc.pid), time.monotonic()
            proc.send_signal(signal.SIGHUP)
            sent += 1
            if watch.wait_for(sent):
                wall = time.monotonic() - w
                costs.append(cpu_seconds(proc.pid) - c - idle_rate * wall)
                walls.append(wall)
        time.sleep(max(0.0, (sent if texts else RUN) * RELOAD_INTERVAL - (time.monotonic() - t0)))
    client.stop()
    cpu = cpu_seconds(proc.pid) - cpu0
    wall = time.monotonic() - t0
    after = status.fetch_snapshot(SOCKET).reloads
    times = sorted(a.elapsed for a in client.attempts if a.ok)
    costs.sort()
    return {"sighups": sent, "reloads": after.get("ok", 0) - before.get("ok", 0),
            "failed_reloads": after.get("failed", 0) - before.get("failed", 0),
            "cpu": cpu, "wall": wall, "rss": rss_mib(proc.pid),
            "cost_median": costs[len(costs) // 2] if costs else float("nan"),
            "cost_mean": sum(costs) / len(costs) if costs else float("nan"),
            "cost_max": costs[-1] if costs else float("nan"),
            "reload_wall": sorted(walls)[len(walls) // 2] if walls else float("nan"),
            "connects": len(client.attempts), "failed": sum(not a.ok for a in client.attempts),
            "p50": times[len(times) // 2] if times else float("nan"),
            "p99": times[int(len(times) * 0.99)] if times else float("nan"),
            "max": times[-1] if times else float("nan"),
            "slow": sum(t > SLOW for t in times),
            "slow_at": [round(a.started - t0, 1) for a in client.attempts if a.ok and a.elapsed > SLOW]}


def main() -> int:
    for module in ("ip_vs", "ip_vs_rr"):
        topology.sh("modprobe", module)
    topology.sh("ipvsadm", "-C")
    workdir = Path(tempfile.mkdtemp(prefix="ipvslb-reload-", dir=os.environ.get("IPVSLB_RESULTS")))
    # The configuration and the state directory on the guest's own filesystem (/var/tmp is
    # a tmpfs in the test VM), as /etc and /var/lib are local on a host; the results
    # directory is shared with the host, and each of its writes and fsyncs is a round trip.
    local = Path(tempfile.mkdtemp(prefix="ipvslb-reload-", dir="/var/tmp"))
    topo = topology.build(3, prefix="br")
    config = local / "config.yaml"
    texts = [config_text(local, topo.backends, SERVICES + 1), config_text(local, topo.backends, SERVICES)]
    config.write_text(texts[1])
    log_path = workdir / "ipvslb.log"
    log = log_path.open("w")
    # PROFILE=1: the daemon's main thread under cProfile, timed in its CPU time, the profile
    # in the logs' directory (for pstats).
    profile = []
    if os.environ.get("PROFILE"):
        profile = ["-c", "import cProfile, runpy, sys, time\n"
                   "p = cProfile.Profile(time.thread_time)\n"
                   "sys.argv = ['ipvslb'] + sys.argv[1:]\n"
                   "p.enable()\n"
                   "try: runpy.run_module('ipvslb', run_name='__main__')\n"
                   f"finally: p.disable(); p.dump_stats({str(workdir / 'daemon.prof')!r})"]
    proc = subprocess.Popen([sys.executable, *(profile or ["-m", "ipvslb"]), "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    try:
        started = time.monotonic()
        wait_healthy(proc, SERVICES)
        print(f"daemon up with {SERVICES} services in {time.monotonic() - started:.0f} s "
              f"(tracer compile included); config file {len(texts[0]) / 1024:.0f} KiB", flush=True)
        time.sleep(5)
        quiet = run(proc, config, log_path, None)
        print("run without reloads done", flush=True)
        idle_rate = quiet["cpu"] / quiet["wall"]
        busy = run(proc, config, log_path, texts, idle_rate)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        topology.sh("ipvsadm", "-C", check=False)
        topo.teardown()
    print(f"\n{SERVICES} services x 3 backends, {RUN:.0f} s per run, a SIGHUP every {RELOAD_INTERVAL:.0f} s "
          f"(one service added or removed), client 50 connects/s, kernel {os.uname().release}\n")
    print(f"{'reloads':>8} {'CPU per reload: median':>23} {'mean':>8} {'max':>8} {'reload wall (median)':>21}")
    print(f"{busy['reloads']:>5}/{busy['sighups']:<2} {busy['cost_median'] * 1000:>20.1f} ms "
          f"{busy['cost_mean'] * 1000:>5.1f} ms {busy['cost_max'] * 1000:>5.1f} ms "
          f"{busy['reload_wall'] * 1000:>18.0f} ms")
    print(f"\nCPU per reload: the daemon's CPU from its SIGHUP to its log line, less {idle_rate * 1000:.0f} ms/s "
          f"(its CPU in the run without reloads) over that time; failed reloads: {busy['failed_reloads']}; "
          f"daemon alive at the end: {alive}\n")
    print(f"{'run':<16} {'daemon CPU':>11} {'RSS':>8} {'connects':>9} {'failed':>7} {'p50':>8} {'p99':>8} "
          f"{'max':>8} {'>0.5 s':>7}")
    for name, r in (("without reloads", quiet), ("with reloads", busy)):
        print(f"{name:<16} {r['cpu']:>9.2f} s {r['rss']:>4.0f} MiB {r['connects']:>9} {r['failed']:>7} "
              f"{r['p50'] * 1000:>5.1f} ms {r['p99'] * 1000:>5.0f} ms {r['max'] * 1000:>5.0f} ms {r['slow']:>7}")
    for name, r in (("without reloads", quiet), ("with reloads", busy)):
        if r["slow_at"]:
            print(f"connects over {SLOW} s {name}, started at (s into the run): {r['slow_at'][:20]}")
    print(f"logs: {workdir}")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
