#!/usr/bin/env python3
"""`make demo`: a live failover demonstration (`testbed/demo.py [--kernel 6.12] [--here]`).

On the host (no IPVS needed) it boots a Debian kernel in a VM through the test bed and runs
itself there with `--here`. Inside, it builds three backends in network
namespaces, starts `ipvslb run` on a VIP in front of them, drives a client loop of 50
connects/s, makes one backend refuse and another blackhole, restores both, shows the live
status table, and ends with a summary.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))  # a script in testbed/: the checkout's packages

from ipvslb import status  # noqa: E402
from ipvslb.snapshot import StatusSnapshot  # noqa: E402
from tests.kernel import topology  # noqa: E402
from tests.kernel.client import CONNECT_TIMEOUT, RATE, ClientLoop  # noqa: E402

VIP, PORT = "10.90.0.1", 80
SOCKET = "/run/ipvslb-demo.sock"  # not in workdir: that may be a 9p share, where sockets cannot live


class WeightWatch:
    """Polls the status socket and remembers when each backend's weight changed."""

    def __init__(self, socket_path: str):
        self.path = socket_path
        self.changes: list[tuple[float, str, int, str]] = []  # (time, backend, weight, state)
        self.latest: StatusSnapshot | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last: dict[str, int] = {}
        while not self._stop.is_set():
            try:
                self.latest = status.fetch_snapshot(self.path)
            except OSError:
                time.sleep(0.05)
                continue
            now = time.monotonic()
            for svc in self.latest.services:
                for b in svc.backends:
                    if last.get(b.endpoint) != b.weight:
                        self.changes.append((now, b.endpoint, b.weight, b.state))
                        last[b.endpoint] = b.weight
            time.sleep(0.02)

    def first_change(self, endpoint: str, after: float, weight_is) -> float | None:
        for t, ep, w, _ in self.changes:
            if ep == endpoint and t >= after and weight_is(w):
                return t
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()


def _config(workdir: Path, backends) -> Path:
    lines = [
        "settings:",
        f"  state_dir: {workdir}/state",
        f"  status_socket: {SOCKET}",
        "  metrics_address: 127.0.0.1:9742",
        "services:",
        "  - name: demo",
        "    protocol: tcp",
        f"    vip: {VIP}",
        f"    port: {PORT}",
        "    scheduler: rr",
        "    backends:",
        *[f"      - {{address: {b.v4}, port: {b.port}, weight: 10}}" for b in backends],
    ]
    path = workdir / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _show(watch: WeightWatch, title: str) -> None:
    print(f"\n--- {title} ---")
    if watch.latest is not None:
        print(status.render(watch.latest))
    sys.stdout.flush()


def run_here(fault_seconds: float = 10.0) -> int:
    for module in ("ip_vs", "ip_vs_rr"):
        topology.sh("modprobe", module)
    # In the VM runner's results directory when there is one, so the host keeps the daemon log.
    workdir = Path(tempfile.mkdtemp(prefix="ipvslb-demo-", dir=os.environ.get("IPVSLB_RESULTS")))
    topo = topology.build(3, prefix="demo")
    b1, b2, b3 = topo.backends
    config = _config(workdir, topo.backends)
    log = (workdir / "daemon.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "ipvslb", "run", "--config", str(config)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=CHECKOUT)
    watch = WeightWatch(SOCKET)
    client = ClientLoop(VIP, PORT)
    try:
        deadline = time.monotonic() + 180
        while not Path(SOCKET).exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((workdir / "daemon.log").read_text())
                print("the daemon did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        watch.start()
        print(f"daemon up; client loop: {RATE} connects/s to {VIP}:{PORT}, connect timeout {CONNECT_TIMEOUT:.0f} s")
        client.start()
        time.sleep(5)
        _show(watch, "all healthy")

        t_refuse = time.monotonic()
        b1.set_mode("refuse")
        print(f"\n>>> {b1.v4}:{b1.port} now refuses connections")
        time.sleep(fault_seconds)
        _show(watch, f"{fault_seconds:.0f} s after {b1.v4} started refusing")

        t_blackhole = time.monotonic()
        b2.set_mode("blackhole")
        print(f"\n>>> {b2.v4}:{b2.port} is now blackholed (SYNs vanish)")
        time.sleep(fault_seconds)
        _show(watch, f"{fault_seconds:.0f} s after {b2.v4} was blackholed")

        t_restore = time.monotonic()
        b1.set_mode("accept")
        b2.set_mode("accept")
        print("\n>>> both restored; waiting for re-admission through probes and slow start")
        restored = {f"{b.v4}:{b.port}" for b in (b1, b2)}
        while time.monotonic() - t_restore < 90 and not _fully_back(watch.latest, restored):
            time.sleep(0.5)
        _show(watch, "after recovery")
    finally:
        client.stop()
        watch.stop()
        daemon.terminate()
        daemon.wait(10)
        topology.sh("ipvsadm", "-C", check=False)
        topo.teardown()

    print("\n=== summary ===")
    for label, b, t_fault in (("refused", b1, t_refuse), ("blackholed", b2, t_blackhole)):
        ep = f"{b.v4}:{b.port}"
        out = watch.first_change(ep, t_fault, lambda w: w == 0)
        back = watch.first_change(ep, t_restore, lambda w: w > 0)
        full = watch.first_change(ep, t_restore, lambda w: w >= 1 and w == _configured(watch, ep))
        print(f"{label:>10} backend {ep}: weight 0 after "
              f"{_ms(out, t_fault)}, back in rotation {_ms(back, t_restore)} after restore, "
              f"full weight {_ms(full, t_restore)} after restore")
    failed = [a for a in client.attempts if not a.ok]
    slow = [a for a in client.attempts if a.ok and a.elapsed > 0.5]
    print(f"client: {len(client.attempts)} connects, {len(failed)} failed, {len(slow)} took over 500 ms "
          f"(rescued from the blackholed backend)")
    for a in failed[:10]:
        print(f"  failed at +{a.started - t_refuse:6.2f} s after {a.elapsed * 1000:.0f} ms: {a.error}")
    print(f"daemon log: {workdir / 'daemon.log'}")
    return 0


def _fully_back(snap: StatusSnapshot | None, endpoints: set[str]) -> bool:
    rows = [b for s in snap.services for b in s.backends if b.endpoint in endpoints] if snap else []
    return len(rows) == len(endpoints) and all(
        b.state == "healthy" and b.weight == b.configured_weight for b in rows)


def _configured(watch: WeightWatch, endpoint: str) -> int:
    for s in watch.latest.services if watch.latest else ():
        for b in s.backends:
            if b.endpoint == endpoint:
                return b.configured_weight
    return -1


def _ms(t: float | None, since: float) -> str:
    return "never" if t is None else f"{(t - since) * 1000:.0f} ms"


def run_in_vm(kernel: str) -> int:
    return subprocess.call([sys.executable, str(CHECKOUT / "testbed" / "run_vm.py"), "--kernels", kernel,
                            "--exec", "python3 testbed/demo.py --here"])


def main() -> int:
    parser = argparse.ArgumentParser(description="Live failover demo: three backends, a client loop of "
                                     f"{RATE} connects/s, one backend refusing, another blackholed, both restored.")
    parser.add_argument("--kernel", default="6.12",
                        help="test-bed kernel for the VM: 6.1, 6.12 or newest (default 6.12)")
    parser.add_argument("--here", action="store_true", help="run on this host instead of a VM (needs root and IPVS)")
    args = parser.parse_args()
    return run_here() if args.here else run_in_vm(args.kernel)


if __name__ == "__main__":
    sys.exit(main())
