"""`ipvslb run` refuses settings it cannot use with one line and exit 1, before the tracer
compile (which would otherwise be repeated at every systemd restart)."""
from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from ipvslb import daemon

SERVICE = "services:\n  - {name: web, vip: 10.0.0.1, port: 80, backends: [10.0.1.1]}\n"


@pytest.fixture
def place():
    # Short: the status socket's path must fit sun_path.
    path = Path(tempfile.mkdtemp(prefix="ipvslb-su-"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield path
    root.handlers[:], root.level = handlers, level
    shutil.rmtree(path)


def run(place: Path, monkeypatch, settings: str) -> int:
    """daemon.main on a file with `settings`; the tracer compile must not be reached."""
    monkeypatch.setattr(daemon.Daemon, "_open_kernel", lambda self: pytest.fail("compiled the tracer"))
    path = place / "config.yaml"
    path.write_text("settings: {" + settings + "}\n" + SERVICE)
    return daemon.main(str(path))


def only_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = (captured.err + captured.out).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_metrics_port_in_use(place, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = run(place, monkeypatch, f"state_dir: {place}/state, status_socket: {place}/s.sock, "
                                       f"metrics_address: '127.0.0.1:{port}'")
    assert code == 1
    assert only_line(capsys).endswith(f"CRITICAL cannot start: cannot listen on settings.metrics_address "
                                      f"127.0.0.1:{port} (Address already in use): another process listens there "
                                      "or the address is not this host's; choose another, or '' for no metrics")


def test_a_state_dir_the_process_cannot_write(place, monkeypatch, capsys):
    code = run(place, monkeypatch, f"state_dir: /proc/sys/ipvslb, status_socket: {place}/s.sock, metrics_address: ''")
    assert code == 1
    assert "CRITICAL cannot start: state directory /proc/sys/ipvslb is not writable" in only_line(capsys)


def test_a_file_at_the_status_socket_path(place, monkeypatch, capsys):
    (place / "s.sock").write_text("keep me\n")
    code = run(place, monkeypatch, f"state_dir: {place}/state, status_socket: {place}/s.sock, metrics_address: ''")
    assert code == 1
    assert f"CRITICAL cannot start: status socket {place}/s.sock: a file that is not a socket" in only_line(capsys)
    assert (place / "s.sock").read_text() == "keep me\n"


def test_a_status_socket_directory_the_process_cannot_write(place, monkeypatch, capsys):
    code = run(place, monkeypatch, f"state_dir: {place}/state, status_socket: /proc/sys/s.sock, metrics_address: ''")
    assert code == 1
    assert "CRITICAL cannot start: status socket /proc/sys/s.sock: directory /proc/sys is not writable" in \
        only_line(capsys)
