"""The status socket: the server takes only its own (stale) socket's path, the client turns
anything but a status document into one line and exit 1."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from ipvslb import cli, status
from ipvslb.snapshot import BackendCounters
from tests.unit import snapshots

DOC = snapshots.snapshot([snapshots.service("web", backends=[
    snapshots.backend("10.0.1.1:80", since=90.0, counters=BackendCounters(successes=3))])]).to_json()


def changed(edit) -> bytes:
    """DOC as JSON after `edit` changed a copy of it."""
    doc = json.loads(json.dumps(DOC))
    edit(doc)
    return json.dumps(doc).encode()


@pytest.fixture
def short_dir():
    # sun_path holds 107 bytes: pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="ipvslb-st-"))
    yield path
    shutil.rmtree(path)


def serve_once(path: Path, answer: bytes) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run():
        with server:
            conn, _ = server.accept()
            with conn:
                conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def serve_and_fetch(path: Path) -> dict:
    server = await status.serve(str(path), lambda: DOC)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, status.fetch, str(path))
    finally:
        server.close()
        await server.wait_closed()


def test_the_server_answers_with_the_snapshot(short_dir):
    path = short_dir / "sub" / "status.sock"
    assert asyncio.run(serve_and_fetch(path)) == DOC
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_stale_socket_is_replaced(short_dir):
    path = short_dir / "status.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed daemon leaves
    assert asyncio.run(serve_and_fetch(path)) == DOC


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_the_server_refuses_a_path_that_is_not_a_socket_and_leaves_it(short_dir, kind):
    path = short_dir / "status.sock"
    if kind == "file":
        path.write_text("precious\n")
    elif kind == "directory":
        path.mkdir()
    else:
        (short_dir / "target").write_text("precious\n")
        path.symlink_to(short_dir / "target")
    with pytest.raises(status.SocketPathTaken) as err:
        asyncio.run(serve_and_fetch(path))
    assert str(err.value).startswith(f"status socket {path}: a {kind} that is not a socket is at that path")
    if kind == "file":
        assert path.read_text() == "precious\n"
    assert path.is_symlink() if kind == "symlink" else path.exists()


def test_the_server_refuses_a_socket_another_process_answers_on(short_dir):
    path = short_dir / "status.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(1)
        with pytest.raises(status.SocketPathTaken, match="another process answers on it"):
            asyncio.run(serve_and_fetch(path))
    assert path.is_socket()


BAD_ANSWERS = {
    "nothing": (b"", "connection closed without an answer"),
    "not JSON": (b"hello\n", "not JSON: Expecting value"),
    "not UTF-8": (b"\xff\xfe{}\n", "not UTF-8 text: byte 0xff at offset 0"),
    "a list": (b"[1, 2]\n", "not a status document: a JSON list"),
    "huge number": (b'{"now": ' + b"9" * 5000 + b"}", "not JSON"),
    "wrong types": (changed(lambda d: d["services"][0].update(name=1)),
                    "not a status document: services[0].name: expected str, got int 1"),
    "services not a list": (changed(lambda d: d.update(services=5)),
                            "not a status document: services: expected a list, got int 5"),
    "backend without weight": (changed(lambda d: d["services"][0]["backends"][0].pop("weight")),
                               "not a status document: services[0].backends[0].weight: missing"),
    "unknown state": (changed(lambda d: d["services"][0]["backends"][0].update(state="s")),
                      "not a status document: services[0].backends[0].state: str 's' is not a health state"),
    "unknown key": (changed(lambda d: d.update(extra=1)), "not a status document: extra: unknown key"),
    "the daemon's error": (json.dumps({"error": "internal error: ZeroDivisionError()"}).encode(),
                           "the daemon reported: internal error: ZeroDivisionError()"),
}


@pytest.mark.parametrize("answer, expected", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
def test_a_malformed_answer_is_one_line_and_exit_1(short_dir, capsys, answer, expected):
    path = short_dir / "status.sock"
    serve_once(path, answer)
    assert cli.main(["status", "--socket", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"ipvslb: malformed answer on {path}: {expected}"), line


def test_json_output_needs_only_a_document(short_dir, capsys):
    path = short_dir / "status.sock"
    serve_once(path, json.dumps({"services": 5}).encode())
    assert cli.main(["status", "--json", "--socket", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"services": 5}


@pytest.mark.parametrize("kind, reason", [("absent", "No such file or directory"),
                                          ("stale", "Connection refused"), ("file", "Connection refused")])
def test_no_daemon_is_one_line_and_exit_1(short_dir, capsys, kind, reason):
    path = short_dir / "status.sock"
    if kind == "stale":
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(path))
    elif kind == "file":
        path.write_text("x")
    assert cli.main(["status", "--socket", str(path)]) == 1
    assert capsys.readouterr().err == (f"ipvslb: cannot reach the daemon at {path}: {reason}. "
                                       "Is `ipvslb run` running?\n")


def test_the_table_renders_a_good_document(short_dir, capsys):
    path = short_dir / "status.sock"
    serve_once(path, json.dumps(DOC).encode())
    assert cli.main(["status", "--socket", str(path)]) == 0
    out = capsys.readouterr().out
    assert "web  tcp 10.0.0.1:80" in out and "10.0.1.1:80" in out and "healthy" in out


def test_scripts_fetch_the_typed_snapshot(short_dir):
    path = short_dir / "status.sock"
    serve_once(path, json.dumps(DOC).encode())
    snap = status.fetch_snapshot(str(path))
    assert snap.services[0].backends[0].counters.successes == 3 and snap.to_json() == DOC
