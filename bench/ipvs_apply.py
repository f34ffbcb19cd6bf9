#!/usr/bin/env python3
"""Benchmark (not a test): ipvslb's apply against `ipvsadm -R` on the same rules.

Runs inside a VM (it needs IPVS):
    testbed/run_vm.py --kernels 6.12 --exec ".venv/bin/python bench/ipvs_apply.py"

1000 services x 10 backends loaded from empty, then an apply of the same state planned
from the manager's snapshot (the no-op: no netlink traffic at all), the same with
`verify=True` (a full read of the kernel, what the daemon does at start, on reload and
every `ipvs_verify_interval`), then a 1 % change (10 services: one weight edited, one
backend replaced) planned from the snapshot, and that change undone with every service
object built anew (as after re-reading a file). ipvsadm gets the same rules, and for the
changes only the 30 commands that make each (it cannot diff); for the no-op and the verify
its nearest equivalent is reading the table (`ipvsadm -Sn`). VIPs are left out on both
sides (ipvsadm does not add addresses); a last line measures them separately. Each
figure is the median of ROUNDS runs, the two tools alternating.
"""
from __future__ import annotations

import ipaddress
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipvslb.ipvs import Manager  # noqa: E402
from ipvslb.model import Backend, Service, Settings  # noqa: E402
from tests.kernel import topology  # noqa: E402

SERVICES, BACKENDS, ROUNDS = 1000, 10, 3
CHANGED = SERVICES // 100


def vip(i: int) -> str:
    return f"10.{100 + i // 250}.{i % 250}.1"


def backend(i: int, j: int, port: int = 8080, weight: int = 1) -> Backend:
    return Backend(ipaddress.ip_address(f"10.77.{j}.{i % 250 + 1}"), port, weight)


def config() -> list[Service]:
    return [Service(f"s{i}", "tcp", ipaddress.ip_address(vip(i)), 80,
                    tuple(backend(i, j) for j in range(BACKENDS))) for i in range(SERVICES)]


def changed(services: list[Service]) -> list[Service]:
    """Every 100th service: backend 0's weight 1 -> 3, backend 1 replaced by a new one."""
    out = list(services)
    for i in range(0, SERVICES, SERVICES // CHANGED):
        b = out[i].backends
        out[i] = replace(out[i], backends=(replace(b[0], weight=3), backend(i, 1, port=9090), *b[2:]))
    return out


def ipvsadm_rules() -> str:
    lines = []
    for i in range(SERVICES):
        lines.append(f"-A -t {vip(i)}:80 -s wlc")
        lines += [f"-a -t {vip(i)}:80 -r {backend(i, j).address}:8080 -m -w 1" for j in range(BACKENDS)]
    return "\n".join(lines) + "\n"


def ipvsadm_change(back: bool = False) -> str:
    lines = []
    new_port, old_port = (8080, 9090) if back else (9090, 8080)
    for i in range(0, SERVICES, SERVICES // CHANGED):
        v = f"{vip(i)}:80"
        lines += [f"-e -t {v} -r {backend(i, 0).address}:8080 -m -w {1 if back else 3}",
                  f"-a -t {v} -r {backend(i, 1).address}:{new_port} -m -w 1",
                  f"-d -t {v} -r {backend(i, 1).address}:{old_port}"]
    return "\n".join(lines) + "\n"


def ipvsadm(*args: str, rules: str | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(["ipvsadm", *args], input=rules, text=True, check=True, capture_output=True)
    return time.perf_counter() - started


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def python_speed() -> float:
    """Seconds for a fixed pure-Python loop: TCG and the other VMs on the host make this
    VM's speed vary by several times between runs; this puts a figure on it."""
    started = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i
    return time.perf_counter() - started


def main() -> None:
    for module in ("ip_vs", "ip_vs_wlc"):
        topology.sh("modprobe", module)
    # `change` shares the 990 unchanged services with `base`, as a caller editing its
    # list would; `rebuilt` is `base` again from new objects, as after re-reading the
    # file, which costs the manager the mapping of every service onto netlink specs.
    base = config()
    change, rebuilt = changed(base), config()
    rules, change_rules, change_back_rules = ipvsadm_rules(), ipvsadm_change(), ipvsadm_change(back=True)
    speed = [python_speed()]
    steps = (("full", base, False), ("noop", base, False), ("verify", base, True), ("change", change, False),
             ("rebuilt", rebuilt, False))
    ours: dict[str, list[float]] = {name: [] for name, _, _ in steps}
    theirs: dict[str, list[float]] = {name: [] for name, _, _ in steps}
    writes: dict[str, int] = {}
    verifies: dict[str, int] = {}
    for _ in range(ROUNDS):
        topology.sh("ipvsadm", "-C")
        theirs["full"].append(ipvsadm("-R", rules=rules))
        theirs["noop"].append(ipvsadm("-Sn"))
        theirs["verify"].append(theirs["noop"][-1])
        theirs["change"].append(ipvsadm("-R", rules=change_rules))
        theirs["rebuilt"].append(ipvsadm("-R", rules=change_back_rules))
        topology.sh("ipvsadm", "-C")
        with tempfile.TemporaryDirectory() as state:
            manager = Manager(Settings(manage_vips=False, state_dir=state))
            for name, services, verify in steps:
                before = manager.verifies
                seconds, result = timed(lambda: manager.apply(services, verify=verify))
                ours[name].append(seconds)
                writes[name] = result.writes
                verifies[name] = manager.verifies - before
            manager.close()
    topology.sh("ipvsadm", "-C")

    with tempfile.TemporaryDirectory() as state:
        manager = Manager(Settings(vip_interface="benchvip0", state_dir=state))
        vip = {name: timed(lambda: manager.apply(base, verify=verify))[0] for name, _, verify in steps[:3]}
        manager.apply([])
        manager.close()
    topology.sh("ip", "link", "del", "benchvip0", check=False)
    speed.append(python_speed())

    rows = [("full load (1000 x 10, from empty)", "full", "ipvsadm -R"),
            ("no-op apply (from the snapshot)", "noop", "ipvsadm -Sn (reads the table)"),
            ("verify apply (full read, no change)", "verify", "ipvsadm -Sn (reads the table)"),
            ("1 % change (10 services, snapshot)", "change", "ipvsadm -R (30 commands)"),
            ("1 % back, every object new", "rebuilt", "ipvsadm -R (30 commands)")]
    print(f"\nIPVS apply, {SERVICES} services x {BACKENDS} backends, median of {ROUNDS}, "
          f"kernel {subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()}")
    print(f"{'operation':38} {'ipvslb':>9} {'writes':>7} {'reads':>6} {'ipvsadm':>9}  {'ratio':>6}  ipvsadm command")
    for label, key, command in rows:
        a, b = statistics.median(ours[key]), statistics.median(theirs[key])
        reads = "full" if verifies[key] else "none"
        print(f"{label:38} {a * 1000:7.1f}ms {writes[key]:7d} {reads:>6} {b * 1000:7.0f}ms  {a / b:5.2f}x  {command}")
    print(f"ipvslb's no-op, each round: {', '.join(f'{t * 1000:.1f} ms' for t in ours['noop'])}")
    print(f"with VIPs on a dummy interface: full load {vip['full'] * 1000:.0f} ms, "
          f"no-op {vip['noop'] * 1000:.1f} ms, verify {vip['verify'] * 1000:.0f} ms")
    print(f"a 1M-step Python loop took {speed[0] * 1000:.0f} ms before and {speed[1] * 1000:.0f} ms after "
          f"(the host, natively: about 50 ms)")


if __name__ == "__main__":
    main()
