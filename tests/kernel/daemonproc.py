"""The daemon as a process for the kernel tests (tests/kernel/test_daemon.py and the modules
that drive `ipvslb run` too): its config file, start and kill, its status, and the
`ipvsadm -Ln` oracle for the weights it writes. The fixtures that use them are in conftest.py."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ipvslb import status
from tests.kernel.conftest import ipvsadm

VIP, PORT = "10.91.0.1", 80
WORK = Path("/run/ipvslb-test")
SOCKET = WORK / "status.sock"
WEIGHT = 10  # large enough for the slow-start ramp to show intermediate weights


def write_config(backends, extra_service: str = "", weights: list[int] | None = None) -> Path:
    """The daemon's config: service `web` over `backends` (at `weights`, by default WEIGHT
    each), then `extra_service` (YAML text under `services:`)."""
    WORK.mkdir(parents=True, exist_ok=True)
    lines = [
        "settings:",
        f"  state_dir: {WORK}/state",
        f"  status_socket: {SOCKET}",
        "  metrics_address: 127.0.0.1:9743",
        "  log_level: debug",
        "services:",
        "  - name: web",
        f"    vip: {VIP}",
        f"    port: {PORT}",
        "    scheduler: rr",
        "    backends:",
        *[f"      - {{address: {b.v4}, port: {b.port}, weight: {w}}}"
          for b, w in zip(backends, weights or [WEIGHT] * len(backends), strict=True)],
    ]
    path = WORK / "config.yaml"
    # Replaced, not rewritten in place: a reload never reads half a file.
    part = path.with_suffix(".part")
    part.write_text("\n".join(lines) + "\n" + extra_service)
    part.replace(path)
    return path


class DaemonProcess:
    def __init__(self, config: Path):
        self.config = config
        # In the VM runner's results directory when there is one: the host can follow it.
        self.log_path = Path(os.environ.get("IPVSLB_RESULTS", WORK)) / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> None:  # bcc compiles for 10 s idle, minutes on a busy host
        if SOCKET.exists():
            SOCKET.unlink()
        log = self.log_path.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "ipvslb", "run", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not SOCKET.exists():
            assert self.proc.poll() is None, f"daemon exited: {self.log()}"
            assert time.monotonic() < deadline, "daemon did not come up"
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self) -> dict:
        return status.fetch(str(SOCKET))

    def backends(self) -> dict[str, dict]:
        return {b["endpoint"]: b for s in self.status()["services"] for b in s["backends"]}

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)


@contextlib.contextmanager
def running(config: Path, log_tail: int = 4000):
    """A module's daemon over a clean IPVS. Afterwards: killed, its log's tail printed, IPVS
    and the VIP interface cleared (the daemon leaves both in place by design; later
    modules start clean)."""
    ipvsadm("-C")
    d = DaemonProcess(config)
    d.start()
    try:
        yield d
    finally:
        d.kill()
        print(d.log()[-log_tail:])
        ipvsadm("-C")
        subprocess.run(["ip", "link", "del", "ipvslb0"], capture_output=True)


def kernel_weights(vip: str = VIP, port: int = PORT) -> dict[str, int]:
    """Destination weights of a TCP VIP as ipvsadm (the independent oracle) sees them."""
    weights, inside = {}, False
    for line in ipvsadm("-Ln").splitlines():
        fields = line.split()
        if fields[:1] == ["TCP"]:
            inside = fields[1] == f"{vip}:{port}"
        elif inside and fields[:1] == ["->"] and fields[1][0].isdigit():
            weights[fields[1]] = int(fields[3])
    return weights


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` (usually the daemon's status) until it is truthy. Not faster: a status
    request takes 4-15 ms round trip under emulation, served on the daemon's event loop, and
    evidence that arrives meanwhile waits (at 20 polls/s one refused run in five took 17 ms
    instead of 7). The tests read their timings from the daemon's weight history, not here."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def first_weight(daemon_backend: dict, weight_is, after: float) -> float | None:
    return next((t for t, w in daemon_backend["weight_history"] if t >= after and weight_is(w)), None)


def endpoint(b) -> str:
    return f"{b.v4}:{b.port}"
