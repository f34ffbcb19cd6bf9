"""Background checks on a real kernel: an HTTP backend that keeps accepting connects but
answers 503 is out within health.active_interval plus one probe, and back once it answers
200 again; a service without active_interval sends no probe traffic while healthy.

Each backend namespace runs a small HTTP server per service port whose status comes from a
file and which counts the requests it serves; the daemon's weight history dates the change."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.conftest import ipvsadm
from tests.kernel.daemonproc import VIP, WORK, DaemonProcess, first_weight, wait_for, write_config

pytestmark = pytest.mark.one_kernel

ACTIVE_PORT, QUIET_PORT = 8081, 8082
INTERVAL, PROBE_TIMEOUT, JITTER = 1.0, 0.5, 0.2
SERVER = r"""
import http.server, sys
from pathlib import Path

port, status_file, count_file = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
served = 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        served += 1
        count_file.write_text(str(served))
        code = int(status_file.read_text() or 200) if status_file.exists() else 200
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
"""


def files(b, port: int) -> tuple[Path, Path]:
    return WORK / f"http-{b.namespace}-{port}.status", WORK / f"http-{b.namespace}-{port}.count"


def set_status(b, code: int) -> None:
    status, _ = files(b, ACTIVE_PORT)
    part = status.with_suffix(".part")
    part.write_text(str(code))
    part.replace(status)


def served(b, port: int) -> int:
    _, count = files(b, port)
    return int(count.read_text() or 0) if count.exists() else 0


def service(name: str, port: int, backends, health_yaml: str) -> str:
    lines = [f"  - name: {name}", f"    vip: {VIP}", f"    port: {port}", "    scheduler: rr", "    backends:",
             *[f"      - {b.v4}:{port}" for b in backends], "    health:",
             *[f"      {line}" for line in health_yaml.splitlines()]]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def checked(_session_topology):
    """The daemon with `api` (HTTP probe, background checks every INTERVAL) and `quiet`
    (HTTP probe, no background checks) over HTTP servers in the backends' namespaces."""
    topo = _session_topology
    topo.reset()
    ipvsadm("-C")
    WORK.mkdir(parents=True, exist_ok=True)
    servers = []
    for b in topo.backends:
        for port in (ACTIVE_PORT, QUIET_PORT):
            for path in files(b, port):
                path.unlink(missing_ok=True)
            servers.append(subprocess.Popen(["ip", "netns", "exec", b.namespace, sys.executable, "-c", SERVER,
                                             str(port), *map(str, files(b, port))]))
    extra = (service("api", ACTIVE_PORT, topo.backends,
                     f"active_interval: {INTERVAL}\nprobe_jitter: {JITTER}\n"
                     f"probe: {{type: http, path: /health, timeout: {PROBE_TIMEOUT}}}")
             + service("quiet", QUIET_PORT, topo.backends, "probe: {type: http, path: /health}"))
    d = DaemonProcess(write_config(topo.backends, extra_service=extra))
    d.start()
    try:
        yield d, topo
    finally:
        d.kill()
        print(d.log()[-4000:])
        for s in servers:
            s.terminate()
            s.wait(5)
        ipvsadm("-C")
        subprocess.run(["ip", "link", "del", "ipvslb0"], capture_output=True)
        topo.reset()


def row(d, b) -> dict:
    return d.backends()[f"{b.v4}:{ACTIVE_PORT}"]


def test_a_backend_answering_503_is_out_within_the_interval_plus_one_probe_and_back_on_200(checked):
    d, topo = checked
    b = topo.backends[0]
    wait_for(lambda: all(served(x, ACTIVE_PORT) >= 1 for x in topo.backends), 10, "a first check of every backend")
    assert row(d, b)["state"] == "healthy"
    set_status(b, 503)
    failing = time.monotonic()
    wait_for(lambda: row(d, b)["state"] == "quarantined", 10, "the 503 backend quarantined")
    out = first_weight(row(d, b), lambda w: w == 0, failing)
    assert out is not None
    took = out - failing
    print(f"503 -> weight 0 in {took * 1000:.0f} ms (interval {INTERVAL} s +- {JITTER:.0%}, probe {PROBE_TIMEOUT} s)")
    assert took <= INTERVAL * (1 + JITTER) + PROBE_TIMEOUT
    assert "HTTP 503" in d.log()

    set_status(b, 200)
    serving = time.monotonic()
    wait_for(lambda: row(d, b)["weight"] > 0, 15, "the backend back in rotation")
    back = first_weight(row(d, b), lambda w: w > 0, serving)
    assert back is not None
    print(f"200 -> weight > 0 in {(back - serving) * 1000:.0f} ms (re-admission: backoff 1 s, rise 2)")
    wait_for(lambda: row(d, b)["state"] == "healthy", 60, "the backend healthy again")


def test_a_service_without_active_interval_sends_no_probe_traffic_while_healthy(checked):
    d, topo = checked
    time.sleep(3 * INTERVAL)  # three rounds of the checked service's checks
    quiet = {f"{b.v4}:{QUIET_PORT}": d.backends()[f"{b.v4}:{QUIET_PORT}"]["state"] for b in topo.backends}
    assert set(quiet.values()) == {"healthy"}
    # The servers count: the checked service's are asked, the quiet one's never.
    assert all(served(b, ACTIVE_PORT) > 0 for b in topo.backends)
    assert [served(b, QUIET_PORT) for b in topo.backends] == [0, 0, 0]
