#!/usr/bin/env python3
"""Benchmark (not a test): ipvslb vs keepalived vs no health checking, one backend failing.

Runs inside one VM (it needs IPVS and BPF); `make bench-failover` installs keepalived and
runs it:
    testbed/run_vm.py --kernels 6.12 --exec "python3 bench/failover.py"

Same topology and client loop for every checker: three backends in network namespaces
behind one VIP (round robin, weight 10 each), a client making 50 connects/s with a 3 s
connect timeout. Each checker sees three faults in turn, each lasting FAULT seconds with a
full recovery in between: a backend whose server was killed (connects are refused), a
backend whose host went away (SYNs vanish), and both at once: the first refuses, and
COMPOUND_DELAY seconds later, while it is still out, the second goes away. The table
gives, per fault, the time from the (last) backend's fault to its weight 0 (or its
removal) in IPVS, and the client connects that failed between the first fault and the
repair.

keepalived runs as Debian packages it (checkers only, `TCP_CHECK` with `delay_loop 1`,
`retry 1`, `connect_timeout 1`, `delay_before_retry 1`); "none" is the same IPVS service
with nobody watching. Kernel sysctls are reset to the kernel's defaults before each
checker, so ipvslb's in-flight rescue (`expire_nodest_conn=1`, which it sets) is counted
as part of ipvslb.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipvslb import status  # noqa: E402
from ipvslb.ipvs.client import IPVS  # noqa: E402
from ipvslb.ipvs.specs import ip  # noqa: E402
from tests.kernel import topology  # noqa: E402
from tests.kernel.client import ClientLoop  # noqa: E402

VIP, PORT, WEIGHT = "10.90.0.1", 80, 10
FAULT = float(os.environ.get("FAULT_SECONDS", 15))
COMPOUND_DELAY = 3.0
# Each fault: its name and its steps, (seconds after the fault began, backend index, mode).
FAULTS = (
    ("refused", ((0.0, 0, "refuse"),)),
    ("blackholed", ((0.0, 1, "blackhole"),)),
    ("refused+blackholed", ((0.0, 0, "refuse"), (COMPOUND_DELAY, 1, "blackhole"))),
)
SETTLE = 5.0
SOCKET = "/run/ipvslb-bench.sock"
SYSCTL_DEFAULTS = {"net.ipv4.vs.expire_nodest_conn": 0, "net.ipv4.vs.expire_quiescent_template": 0,
                   "net.ipv4.vs.conntrack": 0}


class IPVSWatch:
    """Polls IPVS itself, so every checker is judged by the same oracle."""

    def __init__(self):
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with IPVS() as ipvs:
            while not self._stop.is_set():
                weights = {}
                for svc in ipvs.services():
                    for dest in ipvs.dests(svc.spec):
                        weights[f"{ip(dest.spec.address)}:{dest.spec.port}"] = dest.spec.weight
                self.samples.append((time.monotonic(), weights))
                time.sleep(0.005)

    def out_at(self, endpoint: str, after: float) -> float | None:
        """First time at or after `after` the endpoint had weight 0 or was gone."""
        for t, weights in self.samples:
            if t >= after and weights.get(endpoint, 0) == 0:
                return t
        return None

    def all_in(self, endpoints: list[str]) -> bool:
        if not self.samples:
            return False
        weights = self.samples[-1][1]
        return all(weights.get(ep, 0) == WEIGHT for ep in endpoints)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def set_sysctl(name: str, value: int) -> None:
    Path("/proc/sys", *name.split(".")).write_text(f"{value}\n")


def start_none(backends, workdir: Path):
    topology.sh("ipvsadm", "-A", "-t", f"{VIP}:{PORT}", "-s", "rr")
    for b in backends:
        topology.sh("ipvsadm", "-a", "-t", f"{VIP}:{PORT}", "-r", f"{b.v4}:{b.port}", "-m", "-w", str(WEIGHT))
    return None


def start_keepalived(backends, workdir: Path):
    reals = "\n".join(
        f"  real_server {b.v4} {b.port} {{\n    weight {WEIGHT}\n"
        "    TCP_CHECK {\n      connect_timeout 1\n      retry 1\n      delay_before_retry 1\n    }\n  }"
        for b in backends)
    conf = workdir / "keepalived.conf"
    conf.write_text(f"global_defs {{\n  router_id bench\n}}\n"
                    f"virtual_server {VIP} {PORT} {{\n  delay_loop 1\n  lb_algo rr\n  lb_kind NAT\n"
                    f"  protocol TCP\n{reals}\n}}\n")
    log = (workdir / "keepalived.log").open("w")
    return subprocess.Popen(["keepalived", "--dont-fork", "--log-console", "--check", "--use-file", str(conf),
                             "--pid", str(workdir / "k.pid"), "--checkers_pid", str(workdir / "kc.pid")],
                            stdout=log, stderr=subprocess.STDOUT)


def start_ipvslb(backends, workdir: Path):
    conf = workdir / "config.yaml"
    conf.write_text("\n".join([
        "settings:",
        f"  state_dir: {workdir}/state",
        f"  status_socket: {SOCKET}",
        "  metrics_address: 127.0.0.1:9743",
        "services:",
        "  - name: bench",
        "    protocol: tcp",
        f"    vip: {VIP}",
        f"    port: {PORT}",
        "    scheduler: rr",
        "    backends:",
        *[f"      - {{address: {b.v4}, port: {b.port}, weight: {WEIGHT}}}" for b in backends],
    ]) + "\n")
    log = (workdir / "ipvslb.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "ipvslb", "run", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)


def ready(checker: str, watch: IPVSWatch, endpoints: list[str]) -> bool:
    if checker == "ipvslb":
        # Up only once the tracer is attached: the status socket appears after that.
        return Path(SOCKET).exists() and watch.all_in(endpoints)
    return watch.all_in(endpoints)


def settled(checker: str, watch: IPVSWatch, endpoints: list[str]) -> bool:
    if checker == "ipvslb":
        snap = status.fetch_snapshot(SOCKET)
        if any(b.probation_until is not None for svc in snap.services for b in svc.backends):
            return False
    return watch.all_in(endpoints)


def run_checker(checker: str, start, topo, workdir: Path) -> list[dict]:
    topology.sh("ipvsadm", "-C")
    for name, value in SYSCTL_DEFAULTS.items():
        set_sysctl(name, value)
    watch = IPVSWatch()
    watch.start()
    backends = topo.backends
    endpoints = [f"{b.v4}:{b.port}" for b in backends]
    process = start(backends, workdir)
    rows = []
    try:
        deadline = time.monotonic() + 300
        while not ready(checker, watch, endpoints):
            if (process and process.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"{checker} did not bring up the service; see {workdir}")
            time.sleep(0.2)
        client = ClientLoop(VIP, PORT)
        client.start()
        time.sleep(SETTLE)
        for fault, steps in FAULTS:
            t_fault = time.monotonic()
            for offset, index, mode in steps:
                time.sleep(max(0.0, t_fault + offset - time.monotonic()))
                t_last = time.monotonic()
                backends[index].set_mode(mode)
            time.sleep(max(0.0, t_fault + FAULT - time.monotonic()))
            t_repair = time.monotonic()
            for _, index, _ in steps:
                backends[index].set_mode("accept")
            last = backends[steps[-1][1]]
            out = watch.out_at(f"{last.v4}:{last.port}", t_last)
            rows.append({"checker": checker, "fault": fault, "t_fault": t_fault, "t_repair": t_repair,
                         "out": None if out is None or out > t_repair else out - t_last, "client": client})
            # Back to full health before the next fault, so faults do not overlap; for ipvslb
            # also out of probation, where one failure re-quarantines at once.
            deadline = time.monotonic() + 120
            while not settled(checker, watch, endpoints) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(SETTLE)
        client.stop()
    finally:
        if process:
            process.terminate()
            process.wait(20)
        watch.stop()
        topology.sh("ipvsadm", "-C", check=False)
    for row in rows:
        # A connect counts against the fault it started during (connects time out after 3 s).
        attempts = [a for a in row["client"].attempts if row["t_fault"] <= a.started < row["t_repair"]]
        row["connects"] = len(attempts)
        row["failed"] = sum(not a.ok for a in attempts)
        row["slow"] = sum(a.ok and a.elapsed > 0.5 for a in attempts)
    return rows


def main() -> int:
    for module in ("ip_vs", "ip_vs_rr"):
        topology.sh("modprobe", module)
    workdir = Path(tempfile.mkdtemp(prefix="ipvslb-bench-", dir=os.environ.get("IPVSLB_RESULTS")))
    topo = topology.build(3, prefix="bf")
    topo.add_vip(VIP)
    rows = []
    try:
        for checker, start in (("none", start_none), ("keepalived", start_keepalived), ("ipvslb", start_ipvslb)):
            print(f"running {checker} ...", flush=True)
            rows += run_checker(checker, start, topo, workdir)
    finally:
        topo.teardown()
    print(f"\n{FAULT:.0f} s per fault, client 50 connects/s, connect timeout 3 s, kernel {os.uname().release}\n")
    print(f"{'checker':<11} {'fault':<19} {'weight 0 after':>15} {'connects':>9} {'failed':>7} {'slow >0.5 s':>12}")
    for r in rows:
        out = "never" if r["out"] is None else f"{r['out'] * 1000:.0f} ms"
        print(f"{r['checker']:<11} {r['fault']:<19} {out:>15} {r['connects']:>9} {r['failed']:>7} {r['slow']:>12}")
    print("\nfailed connects, ratio to ipvslb (ipvslb counted as 1 when it has 0):")
    by = {(r["checker"], r["fault"]): r["failed"] for r in rows}
    for fault, _ in FAULTS:
        ours = max(by[("ipvslb", fault)], 1)
        print(f"  {fault:<19} keepalived/ipvslb {by[('keepalived', fault)] / ours:6.1f}x   "
              f"none/ipvslb {by[('none', fault)] / ours:6.1f}x")
    print(f"logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
