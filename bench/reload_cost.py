#!/usr/bin/env python3
"""Benchmark (not a test): what a reload costs the daemon and the clients, with many services.

Runs inside one VM (it needs IPVS and BPF):
    testbed/run_vm.py --kernels 6.12 --exec "python3 bench/reload_cost.py"

`ipvslb run` with SERVICES TCP services (each over the same three backends in network
namespaces, weight 10), a client making 50 connects/s (3 s connect timeout) to the first
service. Two runs of RUN seconds each with the same daemon: one without reloads, then one
with a SIGHUP every second, the configuration file alternating between SERVICES services
and SERVICES + 1 (one service added, then removed again). The table gives, per run, the
daemon's CPU time (utime + stime of all its threads, /proc/<pid>/stat), its RSS at the
end, the reloads it completed (its status counters) and the CPU per reload (the run's CPU
less the CPU of the run without reloads, over the reloads), and the client's connect times.
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
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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


def run(proc: subprocess.Popen, config: Path, texts: list[str] | None) -> dict:
    """One RUN-second run of the client; with `texts`, a reload every second, the file
    cycling through them."""
    before = status.fetch_snapshot(SOCKET).reloads
    client = ClientLoop(vip(0), 80)
    cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
    client.start()
    sent = 0
    while (elapsed := time.monotonic() - t0) < RUN:
        if texts:
            config.write_text(texts[sent % len(texts)])
            proc.send_signal(signal.SIGHUP)
            sent += 1
        time.sleep(max(0.0, (sent if texts else RUN) * RELOAD_INTERVAL - elapsed))
    client.stop()
    # Reloads still under way belong to this run.
    deadline = time.monotonic() + 60
    while texts and time.monotonic() < deadline:
        snap = status.fetch_snapshot(SOCKET)
        done = sum(snap.reloads.values()) - sum(before.values())
        if done >= 1 and len(snap.services) == SERVICES + 1 - (sent - 1) % 2:
            break
        time.sleep(0.5)
    cpu = cpu_seconds(proc.pid) - cpu0
    wall = time.monotonic() - t0
    after = status.fetch_snapshot(SOCKET).reloads
    times = sorted(a.elapsed for a in client.attempts if a.ok)
    return {"sighups": sent, "reloads": after.get("ok", 0) - before.get("ok", 0),
            "failed_reloads": after.get("failed", 0) - before.get("failed", 0),
            "cpu": cpu, "wall": wall, "rss": rss_mib(proc.pid),
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
    topo = topology.build(3, prefix="br")
    config = workdir / "config.yaml"
    texts = [config_text(workdir, topo.backends, SERVICES + 1), config_text(workdir, topo.backends, SERVICES)]
    config.write_text(texts[1])
    log = (workdir / "ipvslb.log").open("w")
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
        quiet = run(proc, config, None)
        print("run without reloads done", flush=True)
        busy = run(proc, config, texts)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        topology.sh("ipvsadm", "-C", check=False)
        topo.teardown()
    idle_rate = quiet["cpu"] / quiet["wall"]
    per_reload = (busy["cpu"] - idle_rate * busy["wall"]) / max(busy["reloads"], 1)
    print(f"\n{SERVICES} services x 3 backends, {RUN:.0f} s per run, a SIGHUP every {RELOAD_INTERVAL:.0f} s "
          f"(one service added or removed), client 50 connects/s, kernel {os.uname().release}\n")
    print(f"{'run':<16} {'reloads':>8} {'daemon CPU':>11} {'CPU/reload':>11} {'RSS':>8} {'connects':>9} "
          f"{'failed':>7} {'p50':>8} {'p99':>8} {'max':>8} {'>0.5 s':>7}")
    for name, r in (("without reloads", quiet), ("with reloads", busy)):
        reloads = f"{r['reloads']}/{r['sighups']}" if r["sighups"] else "0"
        cost = f"{per_reload * 1000:.0f} ms" if r is busy else "-"
        print(f"{name:<16} {reloads:>8} {r['cpu']:>9.2f} s {cost:>11} {r['rss']:>4.0f} MiB {r['connects']:>9} "
              f"{r['failed']:>7} {r['p50'] * 1000:>5.1f} ms {r['p99'] * 1000:>5.0f} ms {r['max'] * 1000:>5.0f} ms "
              f"{r['slow']:>7}")
    print(f"\nreloads: SIGHUPs sent / reloads completed (a SIGHUP during a reload asks for one more after "
          f"it); failed reloads: {busy['failed_reloads']}; daemon alive at the end: {alive}")
    print(f"CPU/reload: the run's CPU less {idle_rate * 1000:.0f} ms/s (the run without reloads), over the "
          f"reloads completed")
    for name, r in (("without reloads", quiet), ("with reloads", busy)):
        if r["slow_at"]:
            print(f"connects over {SLOW} s {name}, started at (s into the run): {r['slow_at'][:20]}")
    print(f"logs: {workdir}")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
