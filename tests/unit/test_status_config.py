"""`ipvslb status --config`: the client finds the daemon at the status socket the
configuration sets; --socket outranks it; a configuration that does not load is one line."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from ipvslb import cli
from tests.unit.test_status import serve_once

SERVICE = "services:\n  - {name: web, vip: 10.255.0.1, port: 80, backends: [10.0.1.1]}\n"


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="ipvslb-sc-"))  # sun_path: 107 bytes at most
    yield path
    shutil.rmtree(path)


def _config(directory: Path, socket_path: Path) -> Path:
    path = directory / "config.yaml"
    path.write_text(f"settings:\n  status_socket: {socket_path}\n{SERVICE}")
    return path


def test_status_uses_the_socket_the_configuration_sets(short_dir, capsys):
    sock = short_dir / "elsewhere.sock"
    serve_once(sock, json.dumps({"services": [], "pid": 4242}).encode())
    assert cli.main(["status", "--json", "--config", str(_config(short_dir, sock))]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == 4242


def test_an_explicit_socket_wins_over_the_configuration(short_dir, capsys):
    sock = short_dir / "given.sock"
    serve_once(sock, json.dumps({"services": [], "pid": 7}).encode())
    config = _config(short_dir, short_dir / "not-this.sock")
    assert cli.main(["status", "--json", "--config", str(config), "--socket", str(sock)]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == 7


def test_the_configured_socket_is_the_one_named_when_nobody_answers(short_dir, capsys):
    sock = short_dir / "absent.sock"
    assert cli.main(["status", "--config", str(_config(short_dir, sock))]) == 1
    assert capsys.readouterr().err.startswith(f"ipvslb: cannot reach the daemon at {sock}: ")


@pytest.mark.parametrize("text, problem", [
    (None, "cannot read: No such file or directory"),
    ("settings:\n  status_socket: relative.sock\n" + SERVICE, "settings.status_socket: not an absolute path"),
    ("settings: [\n", "not valid YAML"),
])
def test_a_configuration_that_does_not_load_is_one_line_and_exit_1(short_dir, capsys, text, problem):
    path = short_dir / "config.yaml"
    if text is not None:
        path.write_text(text)
    assert cli.main(["status", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("ipvslb: cannot take the status socket from the configuration (or pass --socket): "
                           f"{path}: "), line
    assert problem in line, line
