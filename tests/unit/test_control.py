"""The control socket: request parsing against the configuration, the answers, and a server
that answers whatever it is sent (random bytes, huge lines, clients that stall) with one
JSON line and keeps serving."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvslb import cli, control, status
from ipvslb.ipvs.specs import DestSpec, KernelDest
from ipvslb.model import Backend, Service
from tests.unit import snapshots

ip = ipaddress.ip_address
WEB = Service("web", "tcp", ip("10.90.0.1"), 80,
              (Backend(ip("10.77.1.2"), 8080), Backend(ip("10.77.2.2"), 8080, 5), Backend(ip("10.77.2.2"), 8081)))
WEB6 = Service("web6", "tcp", ip("fd90::1"), 80, (Backend(ip("fd77::2"), 8080),))
SERVICES = (WEB, WEB6)


class FakeManager:
    """Manager.drain and the dest counters, without a kernel."""

    def __init__(self):
        self.drains: set = set()
        self.calls: list = []
        self.ipvs = self

    def drain(self, service, backend, drained):
        self.calls.append((service, backend, drained))
        (self.drains.add if drained else self.drains.discard)((service, backend))
        return 0 if drained else 5

    def dests(self, spec, stats=False):
        return [KernelDest(DestSpec(b.address.packed, b.port, 0, 0 if (WEB.key, b.key) in self.drains else b.weight,
                                    0, 0), active_conns=3, inactive_conns=1) for b in WEB.backends]


def request(command="drain", service="web", backend="10.77.2.2:8080", **more) -> bytes:
    return json.dumps({"command": command, "service": service, "backend": backend, **more}).encode()


# -- parsing -----------------------------------------------------------------------------

def test_a_request_names_a_configured_backend():
    req = control.parse(request(), SERVICES)
    assert (req.command, req.service, req.backend) == ("drain", WEB, (ip("10.77.2.2"), 8080))
    assert control.parse(request(service="web6", backend="[fd77::2]:8080"), SERVICES).backend == (ip("fd77::2"), 8080)
    assert control.parse(request(backend="10.77.1.2"), SERVICES).backend == (ip("10.77.1.2"), 8080)
    assert control.parse(request(service="web6", backend="fd77::2"), SERVICES).backend == (ip("fd77::2"), 8080)


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe", "request is not UTF-8 text"),
    (b"drain web", "request is not JSON"),
    (b"[1, 2]", "request is a JSON list, expected an object with command, service, backend"),
    (request(extra=1), "unknown key 'extra' in request"),
    (request(command="delete"), 'command "delete": expected one of drain, undrain, drained'),
    (request(command=None), "command null: expected one of"),
    (request(service=["web"]), "service list: expected a service name"),
    (request(backend=8080), "backend 8080: expected ADDR:PORT"),
    (request(service="db"), 'no service "db" in the configuration (services: web, web6)'),
    (request(backend="10.77.9.9:8080"), 'service web has no backend "10.77.9.9:8080" '
                                        "(backends: 10.77.1.2:8080, 10.77.2.2:8080, 10.77.2.2:8081)"),
    (request(backend="10.77.2.2"), 'service web has several backends at "10.77.2.2"'),
    (request(backend="10.77.1.2:http"), 'backend "10.77.1.2:http": expected ADDR:PORT'),
    (request(backend="web-1:8080"), 'backend "web-1:8080": expected ADDR:PORT'),
    (b'[' * 100000, "request is not JSON"),
])
def test_malformed_requests_are_named(data, message):
    with pytest.raises(control.RequestError) as err:
        control.parse(data, SERVICES)
    assert message in str(err.value)


def test_execute_drains_and_answers_with_ipvs_counters():
    manager = FakeManager()
    answer = control.execute(control.parse(request(), SERVICES), manager)
    assert manager.calls == [(WEB.key, (ip("10.77.2.2"), 8080), True)]
    assert answer == {"ok": True, "service": "web", "backend": "10.77.2.2:8080", "drained": True, "changed": True,
                      "weight": 0, "active_connections": 3, "inactive_connections": 1}
    answer = control.execute(control.parse(request("drained"), SERVICES), manager)
    assert answer["drained"] is True and answer["changed"] is False and len(manager.calls) == 1
    assert control.execute(control.parse(request(), SERVICES), manager)["changed"] is False
    answer = control.execute(control.parse(request("undrain"), SERVICES), manager)
    assert answer["drained"] is False and answer["weight"] == 5


def test_a_drain_that_cannot_be_recorded_is_an_error_answer():
    manager = FakeManager()

    def full(*args):
        raise OSError(28, "No space left on device")
    manager.drain = full
    answer = control.execute(control.parse(request(), SERVICES), manager)
    assert answer == {"ok": False, "error": "drain of 10.77.2.2:8080 in web failed: No space left on device"}


# -- the server --------------------------------------------------------------------------

class Server:
    """control.serve on a loop of its own thread, as the daemon runs it."""

    def __init__(self, path: str, handle):
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.ticks = 0   # the loop goes on while clients misbehave
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(control.serve(path, handle))
            self.loop.call_soon(self._tick)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def _tick(self):
        self.ticks += 1
        self.loop.call_later(0.01, self._tick)

    def close(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def short_dir():
    # sun_path holds 107 bytes: pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="ipvslb-ctl-"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def manager():
    return FakeManager()


@pytest.fixture
def server(short_dir, manager):
    def handle(data):
        return control.execute(control.parse(data, SERVICES), manager)
    s = Server(str(short_dir / "control.sock"), handle)
    yield s
    s.close()


def exchange(path: str, data: bytes, timeout: float = 10.0, shut: bool = True) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server answered and closed before reading it all
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
    return json.loads(reply)


def test_the_socket_is_for_its_owner_only(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600


def test_a_request_over_the_socket_and_the_client(server, manager):
    answer = control.request(server.path, "drain", "web", "10.77.2.2:8080")
    assert answer["drained"] is True and manager.drains == {(WEB.key, (ip("10.77.2.2"), 8080))}
    with pytest.raises(control.ControlError, match='no service "db" in the configuration'):
        control.request(server.path, "drain", "db", "10.77.2.2:8080")


def test_a_line_without_its_newline_and_a_second_line_ignored(server, manager):
    assert exchange(server.path, request("drained"))["ok"] is True
    assert exchange(server.path, request("drained") + b"\n" + request("undrain") + b"\n")["ok"] is True
    assert manager.calls == []


def test_a_huge_line_is_refused(server, manager):
    answer = exchange(server.path, b"x" * (1 << 20))
    assert answer == {"ok": False, "error": f"request longer than {control.MAX_REQUEST_BYTES} bytes"}
    try:  # more than the server reads after its answer: it may reset the connection
        exchange(server.path, b"y" * (64 << 20), shut=False)
    except ConnectionResetError:
        pass
    padded = request(backend="10.77.2.2:8080" + " " * control.MAX_REQUEST_BYTES)
    assert "longer than" in exchange(server.path, padded)["error"]
    assert manager.calls == []


def test_nothing_sent_is_an_error_answer(server):
    assert exchange(server.path, b"")["error"] == "no request: the connection closed before a line was sent"


def test_a_stalled_client_is_answered_at_the_timeout_and_others_are_served_meanwhile(server, monkeypatch):
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(server.path)
        slow.sendall(b'{"command": "dra')
        started = time.monotonic()
        assert control.request(server.path, "drained", "web", "10.77.1.2:8080")["ok"] is True
        assert time.monotonic() - started < 0.4   # not queued behind the stalled one
        slow.settimeout(5)
        reply = slow.recv(65536)
        assert json.loads(reply) == {"ok": False, "error": "request not complete within 0.5 s"}
        assert 0.4 < time.monotonic() - started < 3


def test_more_clients_than_the_cap_are_told_busy(server, monkeypatch):
    monkeypatch.setattr(control, "READ_TIMEOUT", 2.0)
    stalled = []
    try:
        for _ in range(control.MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.path)
            stalled.append(s)
        time.sleep(0.2)
        assert exchange(server.path, request("drained"))["error"].startswith("busy:")
    finally:
        for s in stalled:
            s.close()
    time.sleep(0.2)
    assert exchange(server.path, request("drained"))["ok"] is True


def test_a_handler_fault_is_an_error_answer_and_the_server_goes_on(short_dir):
    def broken(data):
        raise ZeroDivisionError("bug")
    s = Server(str(short_dir / "c.sock"), broken)
    try:
        assert exchange(s.path, request())["error"] == "internal error: ZeroDivisionError('bug')"
        assert exchange(s.path, request())["ok"] is False
    finally:
        s.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=6000),
    st.text(max_size=300).map(str.encode),
    st.dictionaries(st.sampled_from(["command", "service", "backend", "x"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=40), st.sampled_from(
                        ["drain", "undrain", "drained", "web", "web6", "10.77.2.2:8080", "[fd77::2]:8080"])),
                    max_size=4).map(lambda d: json.dumps(d).encode()),
))
def test_fuzz_every_request_gets_one_json_answer_and_the_daemon_goes_on(server, manager, data):
    ticks = server.ticks
    answer = exchange(server.path, data)
    assert set(answer) >= {"ok"}
    if answer["ok"]:
        assert answer["service"] in ("web", "web6")
    else:
        assert isinstance(answer["error"], str) and answer["error"] and not answer["error"].startswith("internal")
    assert control.request(server.path, "drained", "web", "10.77.1.2:8080")["ok"] is True
    assert server.thread.is_alive() and server.ticks >= ticks


# -- the commands ------------------------------------------------------------------------

def test_drain_and_undrain_commands(server, manager, capsys):
    assert cli.main(["drain", "web", "10.77.2.2:8080", "--socket", server.path]) == 0
    assert capsys.readouterr().out == "web 10.77.2.2:8080: drained, weight 0, 3 active connections\n"
    assert cli.main(["undrain", "web", "10.77.2.2:8080", "--socket", server.path]) == 0
    assert "web 10.77.2.2:8080: undrained, weight 5" in capsys.readouterr().out
    assert cli.main(["undrain", "web", "10.77.2.2:8080", "--socket", server.path]) == 0
    assert "web 10.77.2.2:8080: already undrained, weight 5" in capsys.readouterr().out
    assert manager.drains == set()


def test_a_bad_service_or_backend_is_named_and_exit_1(server, capsys):
    assert cli.main(["drain", "db", "10.77.2.2:8080", "--socket", server.path]) == 1
    assert 'no service "db" in the configuration (services: web, web6)' in capsys.readouterr().err
    assert cli.main(["undrain", "web", "10.1.1.1:80", "--socket", server.path]) == 1
    assert 'service web has no backend "10.1.1.1:80"' in capsys.readouterr().err


def test_no_daemon_is_one_line_and_exit_1(short_dir, capsys):
    assert cli.main(["drain", "web", "10.77.2.2:8080", "--socket", str(short_dir / "none.sock")]) == 1
    assert "cannot reach the daemon's control socket" in capsys.readouterr().err


def test_the_control_socket_comes_from_the_configuration(short_dir, server, capsys):
    path = short_dir / "config.yaml"
    path.write_text(f"settings:\n  status_socket: {short_dir}/status.sock\nservices: []\n")
    assert cli.main(["drain", "web", "10.77.2.2:8080", "--config", str(path)]) == 0   # control.sock beside it
    path.write_text(f"settings:\n  control_socket: {short_dir}/other.sock\nservices: []\n")
    assert cli.main(["drain", "web", "10.77.2.2:8080", "--config", str(path)]) == 1
    assert f"control socket {short_dir}/other.sock" in capsys.readouterr().err


def test_wait_returns_once_the_active_connections_reach_0(server, manager, monkeypatch, capsys):
    monkeypatch.setattr(cli, "WAIT_POLL", 0.01)
    counts = iter([3, 2, 1, 0])
    dests = manager.dests

    def counting(spec, stats=False):
        active = next(counts, 0)
        return [d._replace(active_conns=active) for d in dests(spec)]
    manager.dests = counting
    assert cli.main(["drain", "web", "10.77.2.2:8080", "--wait", "--socket", server.path]) == 0
    out = capsys.readouterr().out
    assert "3 active connections" in out and "no active connections after" in out


def test_wait_times_out_with_exit_3_and_the_backend_stays_drained(server, manager, monkeypatch, capsys):
    monkeypatch.setattr(cli, "WAIT_POLL", 0.01)
    started = time.monotonic()
    code = cli.main(["drain", "web", "10.77.2.2:8080", "--wait", "--timeout", "0.3", "--socket", server.path])
    assert code == cli.WAIT_TIMEOUT_EXIT == 3
    assert 0.3 <= time.monotonic() - started < 2
    assert "3 active connections still after 0.3 s; the backend stays drained" in capsys.readouterr().err
    assert manager.drains == {(WEB.key, (ip("10.77.2.2"), 8080))}


def test_timeout_needs_wait(server, capsys):
    assert cli.main(["drain", "web", "10.77.2.2:8080", "--timeout", "3", "--socket", server.path]) == 2


def test_status_marks_drained_backends():
    doc = snapshots.snapshot([snapshots.service("web", vip="10.90.0.1:80", backends=[
        snapshots.backend("10.77.2.2:8080", weight=0, configured_weight=5, drained=True),
        snapshots.backend("10.77.1.2:8080", weight=1, configured_weight=1)])], now=10.0)
    rows = {line.split()[0]: line for line in status.render(doc).splitlines() if line.startswith("  10.")}
    assert "healthy (drained)  0/5" in rows["10.77.2.2:8080"]
    assert "drained" not in rows["10.77.1.2:8080"]
