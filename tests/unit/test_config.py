"""Configuration parsing: valid files become the model, every invalid one is a ConfigError
whose lines name the file, the path and the bad value; no input raises anything else."""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvslb import cli, config, model

ROOT = Path(__file__).resolve().parents[2]

SERVICE = """\
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    backends:
      - address: 10.0.1.1
        port: 8080
      - address: 10.0.1.2
        port: 8080
"""


def check_config(tmp_path: Path, capsys, text: str) -> tuple[int, str]:
    """Runs `ipvslb check-config` on `text`; returns the exit code and stderr."""
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    code = cli.main(["check-config", str(path)])
    return code, capsys.readouterr().err


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


# --- malformed files: exit 1, the path and the value named ------------------------------

def extra_service(body: str) -> str:
    return SERVICE + textwrap.indent(textwrap.dedent(body), "  ")


MALFORMED = {
    "port 0": (edit(SERVICE, "port: 80", "port: 0"), "services[0].port: out of range: got 0"),
    "port 70000": (edit(SERVICE, "port: 80", "port: 70000"), "services[0].port: out of range: got 70000"),
    "port as string": (edit(SERVICE, "port: 80", "port: '80'"), "services[0].port: not an integer: got '80'"),
    "port as bool": (edit(SERVICE, "port: 80", "port: true"), "services[0].port: not an integer: got True"),
    "backend port 0": (edit(SERVICE, "port: 8080", "port: 0"),
                       "services[0].backends[0].port: out of range: got 0"),
    "weight negative": (edit(SERVICE, "port: 8080\n", "port: 8080\n        weight: -1\n"),
                        "services[0].backends[0].weight: out of range: got -1"),
    "weight bool": (edit(SERVICE, "port: 8080\n", "port: 8080\n        weight: yes\n"),
                    "services[0].backends[0].weight: not an integer: got True"),
    "bad vip": (edit(SERVICE, "vip: 10.0.0.1", "vip: 10.0.0.300"),
                "services[0].vip: not an IP address: got '10.0.0.300'"),
    "vip as integer": (edit(SERVICE, "vip: 10.0.0.1", "vip: 167772161"),
                       "services[0].vip: not a string: got 167772161"),
    "multicast vip": (edit(SERVICE, "vip: 10.0.0.1", "vip: 224.0.0.1"),
                      "services[0].vip: not a unicast address: got '224.0.0.1'"),
    "loopback vip": (edit(SERVICE, "vip: 10.0.0.1", "vip: 127.0.0.5"),
                     "services[0].vip: loopback address: got '127.0.0.5'"),
    "loopback IPv6 vip": ("services:\n  - {name: a, vip: '::1', port: 80, backends: ['[fd00::2]:80']}\n",
                          "services[0].vip: loopback address: got '::1'"),
    "IPv4-mapped loopback vip": ("services:\n  - {name: a, vip: '::ffff:127.0.0.1', port: 80, "
                                 "backends: ['[fd00::2]:80']}\n",
                                 "services[0].vip: loopback address: got '::ffff:127.0.0.1'"),
    "link-local vip": (edit(SERVICE, "vip: 10.0.0.1", "vip: 169.254.0.9"),
                       "services[0].vip: link-local address: got '169.254.0.9'"),
    "link-local IPv6 vip": ("services:\n  - {name: a, vip: 'fe80::1', port: 80, backends: ['[fd00::2]:80']}\n",
                            "services[0].vip: link-local address: got 'fe80::1'"),
    "broadcast vip": (edit(SERVICE, "vip: 10.0.0.1", "vip: 255.255.255.255"),
                      "services[0].vip: broadcast address: got '255.255.255.255'"),
    "unspecified vip": (edit(SERVICE, "vip: 10.0.0.1", "vip: 0.0.0.0"),
                        "services[0].vip: not a unicast address: got '0.0.0.0'"),
    "vip equal to a backend": (edit(SERVICE, "address: 10.0.1.2", "address: 10.0.0.1"),
                               "services[0].backends[1].address: backend is the service's VIP: got '10.0.0.1', "
                               "expected an address other than the VIP"),
    "vip equal to a compact backend": (edit(SERVICE, "      - address: 10.0.1.2\n        port: 8080\n",
                                            "      - 10.0.0.1:81\n"),
                                       "services[0].backends[1]: backend is the service's VIP: got '10.0.0.1'"),
    "service name of 65 characters": (edit(SERVICE, "name: web", "name: " + "w" * 65),
                                      f"services[0].name: name too long: got '{'w' * 25}"),
    "service name with a control character": (edit(SERVICE, "name: web", 'name: "web\\x07"'),
                                              "services[0].name: bad name: got 'web\\x07'"),
    "huge hexadecimal port": (edit(SERVICE, "port: 80", "port: 0x" + "f" * 5000),
                              "services[0].port: integer beyond 64 bits: got 0xffffffffffffffffff…ffffffff (5002 "
                              "characters), expected an integer from 1 to 65535"),
    "huge binary weight": (edit(SERVICE, "port: 8080\n", "port: 8080\n        weight: 0b" + "1" * 20000 + "\n"),
                           "services[0].backends[0].weight: integer beyond 64 bits: got 0b111111111111111111…"),
    "huge decimal timeout": (edit(SERVICE, "port: 80\n", "port: 80\n    persistence_timeout: " + "9" * 5000 + "\n"),
                             "services[0].persistence_timeout: integer beyond 64 bits: got 99999999999999999999…"),
    "integer of 65 bits": (edit(SERVICE, "port: 80", f"port: {2**64}"),
                           f"services[0].port: integer beyond 64 bits: got {2**64}, expected"),
    "negative integer of 65 bits": (edit(SERVICE, "port: 80", f"port: -{2**64}"),
                                    f"services[0].port: integer beyond 64 bits: got -{2**64}, expected"),
    "huge sexagesimal integer": (edit(SERVICE, "port: 80", "port: 1" + ":59" * 2000),
                                 "services[0].port: integer beyond 64 bits: got "
                                 "1:59:59:59:59:59:59:…59:59:59 (6001 characters)"),
    "huge integer as a backend": (edit(SERVICE, "      - address: 10.0.1.2\n        port: 8080\n",
                                       "      - " + "7" * 300 + "\n"),
                                  "services[0].backends[1]: not a mapping or string: got 77777777777777777777…"),
    "bad backend address": (edit(SERVICE, "address: 10.0.1.2", "address: backend-2"),
                            "services[0].backends[1].address: not an IP address: got 'backend-2'"),
    "unknown backend key": (edit(SERVICE, "port: 8080\n", "port: 8080\n        wieght: 3\n"),
                            "services[0].backends[0].wieght: unknown key: got 'wieght', "
                            "expected one of address, port, weight"),
    "unknown service key": (edit(SERVICE, "port: 80\n", "port: 80\n    helth: {}\n"),
                            "services[0].helth: unknown key: got 'helth'"),
    "unknown top-level key": (SERVICE + "setings: {}\n",
                              "setings: unknown key: got 'setings', expected one of settings, services"),
    "unknown scheduler": (edit(SERVICE, "port: 80\n", "port: 80\n    scheduler: fastest\n"),
                          "services[0].scheduler: unknown value: got 'fastest', expected one of rr, wrr"),
    "unknown protocol": (edit(SERVICE, "port: 80\n", "port: 80\n    protocol: sctp\n"),
                         "services[0].protocol: unknown value: got 'sctp', expected one of tcp, udp"),
    "unknown forwarding": (edit(SERVICE, "port: 80\n", "port: 80\n    forwarding: nat\n"),
                           "services[0].forwarding: unknown value: got 'nat'"),
    "negative persistence": (edit(SERVICE, "port: 80\n", "port: 80\n    persistence_timeout: -5\n"),
                             "services[0].persistence_timeout: out of range: got -5"),
    "bad service name": (edit(SERVICE, "name: web", "name: my web"),
                         "services[0].name: bad name: got 'my web'"),
    "missing vip": (edit(SERVICE, "    vip: 10.0.0.1\n", ""),
                    "services[0].vip: missing: expected a unicast IPv4 or IPv6"),
    "duplicate service key": (extra_service("""\
        - name: web2
          vip: 10.0.0.1
          port: 80
          backends: [10.0.2.1]
        """), "services[1]: duplicate protocol, vip and port: got 'tcp 10.0.0.1:80'"),
    "duplicate service key, IPv6 spelled differently": (
        "services:\n"
        "  - {name: a, vip: 'fd00::1', port: 80, backends: ['[fd00::10]:80']}\n"
        "  - {name: b, vip: 'fd00:0:0::1', port: 80, backends: ['[fd00::11]:80']}\n",
        "services[1]: duplicate protocol, vip and port: got 'tcp [fd00::1]:80'"),
    "duplicate service name": (extra_service("""\
        - name: web
          vip: 10.0.0.2
          port: 80
          backends: [10.0.2.1]
        """), "services[1].name: duplicate name: got 'web', expected a name no other service has (services[0]"),
    "duplicate backend": (edit(SERVICE, "address: 10.0.1.2", "address: 10.0.1.1"),
                          "services[0].backends[1]: duplicate backend: got '10.0.1.1:8080'"),
    "duplicate backend, compact and mapping": (
        edit(SERVICE, "      - address: 10.0.1.2\n        port: 8080\n", "      - 10.0.1.1:8080\n"),
        "services[0].backends[1]: duplicate backend: got '10.0.1.1:8080', expected each address and port once "
        "(backends[0] has it)"),
    "IPv6 backend for IPv4 VIP": (edit(SERVICE, "address: 10.0.1.2", "address: 'fd00::2'"),
                                  "services[0].backends[1].address: IPv6 backend for an IPv4 VIP: got 'fd00::2'"),
    "IPv4 backend for IPv6 VIP, route": (
        "services:\n  - {name: a, vip: 'fd00::1', port: 80, forwarding: route, backends: [10.0.0.5]}\n",
        "services[0].backends[0]: IPv4 backend for an IPv6 VIP: got '10.0.0.5'"),
    "route forwarding with another port": (
        edit(SERVICE, "port: 80\n", "port: 80\n    forwarding: route\n"),
        "services[0].backends[0].port: port differs from the service port under route forwarding: got 8080"),
    "no backends": (edit(SERVICE, SERVICE[SERVICE.index("    backends"):], "    backends: []\n"),
                    "services[0].backends: empty: got [], expected a non-empty list of backends"),
    "backends missing": (edit(SERVICE, SERVICE[SERVICE.index("    backends"):], ""),
                         "services[0].backends: missing: expected a non-empty list of backends"),
    "backends not a list": (edit(SERVICE, SERVICE[SERVICE.index("    backends"):], "    backends: 10.0.1.1\n"),
                            "services[0].backends: not a list: got '10.0.1.1'"),
    "compact backend with bad port": (edit(SERVICE, "      - address: 10.0.1.2\n        port: 8080\n",
                                           "      - 10.0.1.2:99999\n"),
                                      "services[0].backends[1]: bad port: got '10.0.1.2:99999'"),
    "compact IPv6 backend without brackets close": (
        "services:\n  - {name: a, vip: 'fd00::1', port: 80, backends: ['[fd00::2:80']}\n",
        "services[0].backends[0]: not an address: got '[fd00::2:80'"),
    "backend is a number": (edit(SERVICE, "      - address: 10.0.1.2\n        port: 8080\n", "      - 42\n"),
                            "services[0].backends[1]: not a mapping or string: got 42"),
    "health rise 0": (SERVICE + "    health: {rise: 0}\n", "services[0].health.rise: out of range: got 0"),
    "health fraction above 1": (SERVICE + "    health: {slow_start_initial_fraction: 1.5}\n",
                                "services[0].health.slow_start_initial_fraction: out of range: got 1.5, "
                                "expected a number > 0 and <= 1"),
    "health key removed": (SERVICE + "    health: {correlated_fraction: 0.5}\n",
                           "services[0].health.correlated_fraction: removed: quarantines freeze on this host's "
                           "own evidence"),
    "health negative duration": (SERVICE + "    health: {slow_start: -1}\n",
                                 "services[0].health.slow_start: out of range: got -1"),
    "health duration nan": (SERVICE + "    health: {probation: .nan}\n",
                            "services[0].health.probation: not a finite number: got nan"),
    "health duration as string": (SERVICE + "    health: {probation: 30s}\n",
                                  "services[0].health.probation: not a number: got '30s'"),
    "health max_quarantined negative": (SERVICE + "    health: {max_quarantined: -1}\n",
                                        "services[0].health.max_quarantined: out of range: got -1, "
                                        "expected an integer >= 0 or null"),
    "health backoff max below initial": (SERVICE + "    health: {probe_backoff_initial: 5, probe_backoff_max: 2}\n",
                                         "services[0].health.probe_backoff_max: below probe_backoff_initial: got 2.0"),
    "health enabled as string": (SERVICE + "    health: {enabled: 'no'}\n",
                                 "services[0].health.enabled: not a boolean: got 'no', expected true or false"),
    "health not a mapping": (SERVICE + "    health: [rise]\n", "services[0].health: not a mapping: got ['rise']"),
    "scheduler flag of another scheduler": (
        edit(SERVICE, "port: 80\n", "port: 80\n    scheduler_flags: [sh-port]\n"),
        "services[0].scheduler_flags[0]: flag of the sh scheduler: got 'sh-port'"),
    "unknown scheduler flag": (
        edit(SERVICE, "port: 80\n", "port: 80\n    scheduler: sh\n    scheduler_flags: [sh-portt]\n"),
        "services[0].scheduler_flags[0]: unknown value: got 'sh-portt'"),
    "conn_reuse_mode 3": ("settings:\n  sysctls:\n    conn_reuse_mode: 3\n" + SERVICE,
                          "settings.sysctls.conn_reuse_mode: unknown value: got 3, expected one of auto, 0, 1, 2"),
    "conn_reuse_mode bool": ("settings:\n  sysctls:\n    conn_reuse_mode: true\n" + SERVICE,
                             "settings.sysctls.conn_reuse_mode: unknown value: got True"),
    "sysctl as integer": ("settings:\n  sysctls:\n    conntrack: 1\n" + SERVICE,
                          "settings.sysctls.conntrack: not a boolean: got 1"),
    "interface name with a control character": ('settings: {vip_interface: "lb\\x1b0"}\n' + SERVICE,
                                                "settings.vip_interface: bad interface name: got 'lb\\x1b0'"),
    "state_dir with a control character": ('settings: {state_dir: "/var/lib/\\x1b[31m"}\n' + SERVICE,
                                           "settings.state_dir: control character in path: got '/var/lib/\\x1b[31m'"),
    "tracer capacity string": ("settings:\n  tracer: {connection_capacity: big}\n" + SERVICE,
                               "settings.tracer.connection_capacity: not an integer: got 'big'"),
    "verify interval below a second": ("settings: {ipvs_verify_interval: 0}\n" + SERVICE,
                                       "settings.ipvs_verify_interval: out of range: got 0, expected a number >= 1"),
    "verify interval as string": ("settings: {ipvs_verify_interval: 30s}\n" + SERVICE,
                                  "settings.ipvs_verify_interval: not a number: got '30s'"),
    "nice out of range": ("settings: {nice: -21}\n" + SERVICE,
                          "settings.nice: out of range: got -21, expected an integer from -20 to 19 or null"),
    "nice as string": ("settings: {nice: high}\n" + SERVICE, "settings.nice: not an integer: got 'high'"),
    "notify command as a string": ('settings: {notify_command: "/usr/bin/logger down"}\n' + SERVICE,
                                   "settings.notify_command: not a list: got '/usr/bin/logger down', expected a "
                                   "list of 1 to 64 of: a string"),
    "notify command searched in PATH": ("settings: {notify_command: [logger, down]}\n" + SERVICE,
                                        "settings.notify_command[0]: not an absolute path: got 'logger', "
                                        "expected the program as an absolute path (no shell, no PATH search)"),
    "notify command empty": ("settings: {notify_command: []}\n" + SERVICE,
                             "settings.notify_command: empty: got []"),
    "notify command argument not a string": ("settings: {notify_command: [/usr/bin/logger, 3]}\n" + SERVICE,
                                             "settings.notify_command[1]: not a string: got 3"),
    "notify timeout zero": ("settings: {notify_timeout: 0}\n" + SERVICE,
                            "settings.notify_timeout: out of range: got 0, expected a number > 0"),
    "notify concurrency above 16": ("settings: {notify_concurrency: 17}\n" + SERVICE,
                                    "settings.notify_concurrency: out of range: got 17, expected an integer "
                                    "from 1 to 16"),
    "log level": ("settings: {log_level: verbose}\n" + SERVICE,
                  "settings.log_level: unknown value: got 'verbose', expected one of debug, info"),
    "metrics address without port": ("settings: {metrics_address: 127.0.0.1}\n" + SERVICE,
                                     "settings.metrics_address: no port: got '127.0.0.1'"),
    "relative state_dir": ("settings: {state_dir: var/lib}\n" + SERVICE,
                           "settings.state_dir: not an absolute path: got 'var/lib'"),
    "interface name too long": ("settings: {vip_interface: ipvslb-interface0}\n" + SERVICE,
                                "settings.vip_interface: bad interface name: got 'ipvslb-interface0'"),
    "settings not a mapping": ("settings: 3\n" + SERVICE, "settings: not a mapping: got 3"),
    "services not a list": ("services: {name: web}\n", "services: not a list: got {'name': 'web'}"),
    "service not a mapping": ("services: [web]\n", "services[0]: not a mapping: got 'web'"),
    "services missing": ("settings: {}\n", "services: missing: expected a list of services"),
    "non-string key": (edit(SERVICE, "port: 80\n", "port: 80\n    1: x\n"), "services[0].1: unknown key: got 1"),
    "duplicate YAML key": (edit(SERVICE, "port: 80\n", "port: 80\n    port: 81\n"),
                           "line 5, column 5: duplicate key: got 'port', expected each key once in a mapping "
                           "(first at line 4)"),
    "empty file": ("", "file is empty, expected a mapping with 'services'"),
    "only comments": ("# nothing yet\n", "file is empty, expected a mapping with 'services'"),
    "not YAML": ("services:\n  - name: a\n   vip: [\n", "line 3, column 4: not valid YAML: while parsing a block "
                 "collection, expected <block end>, but found '<block mapping start>'"),
    "tab indentation": ("services:\n\t- name: a\n", "line 2, column 1: not valid YAML"),
    "two documents": (SERVICE + "---\n" + SERVICE, "line 10, column 1: not valid YAML: expected a single document "
                      "in the stream, but found another document"),
    "impossible date": ("services: 2024-02-30\n", "line 1, column 11: not valid YAML: cannot read '2024-02-30' as "
                        "tag:yaml.org,2002:timestamp (day is out of range for month)"),
    "bad explicit tag": ("services: !!bool maybe\n", "line 1, column 11: not valid YAML: cannot read 'maybe' as "
                         "tag:yaml.org,2002:bool"),
    "NUL character": ("services: \0\n", "not valid YAML: unacceptable character #x0000"),
    "top level is a list": ("- name: web\n", "top level: not a mapping: got [{'name': 'web'}], "
                                             "expected a mapping with keys settings, services"),
    "top level is a string": ("hello\n", "top level: not a mapping: got 'hello'"),
}


@pytest.mark.parametrize("text, expected", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_fails_check_config(tmp_path, capsys, text, expected):
    code, err = check_config(tmp_path, capsys, text)
    assert code == 1
    assert f"{tmp_path / 'config.yaml'}: {expected}" in err


def test_every_error_is_reported_at_once(tmp_path, capsys):
    text = edit(edit(SERVICE, "port: 80", "port: 0"), "address: 10.0.1.2", "address: nowhere")
    text = "settings: {log_level: loud}\n" + text + "    health: {rise: 0}\n"
    code, err = check_config(tmp_path, capsys, text)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 4, err
    for path in ("settings.log_level", "services[0].port", "services[0].backends[1].address",
                 "services[0].health.rise"):
        assert any(f": {path}: " in line for line in lines), path


def test_missing_file_is_an_error_not_a_traceback(tmp_path, capsys):
    code = cli.main(["check-config", str(tmp_path / "absent.yaml")])
    assert code == 1
    assert capsys.readouterr().err == f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory\n"


@contextlib.contextmanager
def within(seconds: float):
    """Fails the test (instead of hanging it) when the block takes longer than `seconds`."""
    def expire(signum, frame):
        raise AssertionError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def special_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "config.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    else:
        path.symlink_to(kind)
    return path


@pytest.mark.parametrize("kind, shown", [
    ("directory", "a directory"), ("FIFO", "a FIFO"), ("socket", "a socket"),
    ("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_only_regular_files_are_read(tmp_path, capsys, kind, shown):
    path = special_file(tmp_path, kind)
    with within(5):
        assert cli.main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err == f"{path}: not a regular file: got {shown}, expected a YAML file\n"


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text(SERVICE)
    (tmp_path / "link.yaml").symlink_to(real)
    assert len(config.load(tmp_path / "link.yaml").services) == 1


def test_a_file_over_the_size_cap_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    # Valid YAML of the cap's size plus one byte: refused for its size alone.
    path.write_text(SERVICE + "#" * (config.MAX_FILE_BYTES - len(SERVICE)) + "\n")
    monkeypatch.setattr(config, "parse", lambda *a: pytest.fail("parsed"))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.messages == [f"{path}: file too large: got {config.MAX_FILE_BYTES + 1} bytes, "
                                  f"expected at most {config.MAX_FILE_BYTES} (2 MiB)"]


def test_a_file_at_the_size_cap_is_read(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SERVICE + "#" * (config.MAX_FILE_BYTES - len(SERVICE) - 1) + "\n")
    assert path.stat().st_size == config.MAX_FILE_BYTES
    assert len(config.load(path).services) == 1


def test_errors_beyond_fifty_are_counted_not_shown(tmp_path, capsys):
    text = "services:\n" + "".join(f"  - {{name: s{i}, vip: 10.0.0.1, port: 0, backends: [10.0.1.1]}}\n"
                                   for i in range(80))
    code, err = check_config(tmp_path, capsys, text)
    lines = err.splitlines()
    # 80 bad ports and 79 duplicate (protocol, vip, port)... of which the ports are invalid, so
    # only the 80 port lines: 50 shown, 30 counted.
    assert code == 1 and len(lines) == 51, err
    assert lines[49].endswith("services[49].port: out of range: got 0, expected an integer from 1 to 65535")
    assert lines[50] == f"{tmp_path / 'config.yaml'}: 30 more problems not shown"


def test_paths_the_packaged_unit_cannot_write_are_warned_about(tmp_path, capsys):
    text = "settings: {state_dir: /srv/lb, status_socket: /tmp/lb.sock}\n" + SERVICE
    code, err = check_config(tmp_path, capsys, text)
    path = tmp_path / "config.yaml"
    assert code == 0
    assert err.splitlines() == [
        f"{path}: settings.state_dir: warning: not writable under the packaged ipvslb.service: got '/srv/lb', "
        "expected a path below /var/lib/ipvslb or /run/ipvslb (or add ReadWritePaths= in a drop-in)",
        f"{path}: settings.status_socket: warning: not writable under the packaged ipvslb.service: "
        "got '/tmp/lb.sock', expected a path below /var/lib/ipvslb or /run/ipvslb (or add ReadWritePaths= "
        "in a drop-in)"]
    code, err = check_config(tmp_path, capsys, "settings: {state_dir: /var/lib/ipvslb/x, "
                                               "status_socket: /run/ipvslb/s.sock}\n" + SERVICE)
    assert (code, err) == (0, "")


def test_unit_writable_paths_are_the_packaged_units():
    unit = (ROOT / "packaging/ipvslb.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["ProtectSystem"] == "strict"
    assert config.UNIT_WRITABLE == (f"/var/lib/{settings['StateDirectory']}", f"/run/{settings['RuntimeDirectory']}")
    # The defaults are writable, so the packaged file gets no warning.
    assert config.unit_warnings(model.Config()) == []


def test_binary_file_is_an_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"services: []\n\xff\xfe")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.messages == [f"{path}: not UTF-8 text: byte 0xff at offset 13"]


def test_long_values_are_shortened_in_messages():
    with pytest.raises(config.ConfigError) as err:
        config.parse("services: " + "x" * 10000, "c.yaml")
    (line,) = err.value.messages
    assert line.startswith("c.yaml: services: not a list: got 'xxx") and len(line) < 200


# --- valid files ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["examples/config.yaml", "packaging/config.yaml"])
def test_shipped_files_pass_check_config(capsys, name):
    assert cli.main(["check-config", str(ROOT / name)]) == 0
    assert capsys.readouterr().out.startswith(f"{ROOT / name}: ok")


def test_check_config_runs_as_a_module():
    run = subprocess.run([sys.executable, "-m", "ipvslb", "check-config", str(ROOT / "examples/config.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "ok (3 services, 9 backends)" in run.stdout


def test_packaged_file_has_defaults_and_no_services():
    assert config.load(ROOT / "packaging/config.yaml") == model.Config()


def test_example_has_tcp_udp_and_ipv6_services():
    services = config.load(ROOT / "examples/config.yaml").services
    assert {(s.protocol, s.family) for s in services} == {("tcp", 4), ("udp", 4), ("tcp", 6)}


def test_defaults_and_types():
    cfg = config.parse(SERVICE, "c.yaml")
    assert cfg.settings == model.Settings()
    (svc,) = cfg.services
    assert svc == model.Service(
        name="web", protocol="tcp", vip=ipaddress.IPv4Address("10.0.0.1"), port=80,
        backends=(model.Backend(ipaddress.IPv4Address("10.0.1.1"), 8080, 1),
                  model.Backend(ipaddress.IPv4Address("10.0.1.2"), 8080, 1)),
        scheduler="wlc", persistence_timeout=0, forwarding="masq", scheduler_flags=(),
        health=model.HealthSettings())
    assert isinstance(cfg.services, tuple) and isinstance(svc.backends, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        svc.port = 81  # type: ignore[misc]


def test_compact_backend_forms():
    text = """\
        services:
          - name: v4
            vip: 10.0.0.1
            port: 80
            backends: [10.0.1.1, "10.0.1.2:8080"]
          - name: v6
            vip: "fd00::1"
            port: 443
            backends: ["fd00::10", "[fd00::11]", "[fd00::12]:8443"]
        """
    v4, v6 = config.parse(textwrap.dedent(text), "c.yaml").services
    assert [(str(b.address), b.port, b.weight) for b in v4.backends] == [("10.0.1.1", 80, 1), ("10.0.1.2", 8080, 1)]
    assert [(str(b.address), b.port) for b in v6.backends] == [("fd00::10", 443), ("fd00::11", 443),
                                                               ("fd00::12", 8443)]
    assert all(isinstance(b.address, ipaddress.IPv6Address) for b in v6.backends)


def test_every_setting_can_be_given():
    text = """\
        settings:
          vip_interface: lb0
          manage_vips: false
          state_dir: /srv/ipvslb
          status_socket: /run/lb.sock
          metrics_address: "[::1]:9100"
          log_level: debug
          nice: null
          ipvs_verify_interval: 5
          notify_command: [/usr/local/bin/page, --source, ipvslb]
          notify_timeout: 2.5
          notify_concurrency: 1
          sysctls: {conntrack: false, expire_nodest_conn: false, expire_quiescent_template: false,
                    conn_reuse_mode: 0}
          tracer: {connection_capacity: 1024, ring_buffer_pages: 8}
        services:
          - name: dns
            protocol: udp
            vip: 10.0.0.53
            port: 53
            scheduler: mh
            scheduler_flags: [mh-fallback, mh-port]
            persistence_timeout: 60
            forwarding: tunnel
            backends:
              - {address: 10.0.1.1, weight: 5}
              - {address: "fd00::1", port: 53, weight: 0}
            health:
              enabled: false
              connect_deadline_floor: 0.1
              connect_deadline_multiple: 3
              connect_history_min: 50
              failure_threshold: 5
              max_quarantined: 1
              quarantine_weight: 1
              probe_backoff_initial: 0.5
              probe_backoff_factor: 1.5
              probe_backoff_max: 60
              probe_jitter: 0
              rise: 3
              slow_start: 20
              slow_start_initial_fraction: 0.25
              probation: 60
              udp_reply_window: 2
        """
    cfg = config.parse(textwrap.dedent(text), "c.yaml")
    assert cfg.settings == model.Settings(
        vip_interface="lb0", manage_vips=False, state_dir="/srv/ipvslb", status_socket="/run/lb.sock",
        metrics_address="[::1]:9100", log_level="debug", nice=None, ipvs_verify_interval=5.0,
        notify_command=("/usr/local/bin/page", "--source", "ipvslb"), notify_timeout=2.5, notify_concurrency=1,
        sysctls=model.Sysctls(False, False, False, 0), tracer=model.TracerSettings(1024, 8))
    (svc,) = cfg.services
    assert (svc.protocol, svc.scheduler, svc.scheduler_flags, svc.persistence_timeout, svc.forwarding) == (
        "udp", "mh", ("mh-fallback", "mh-port"), 60, "tunnel")
    # Tunnel forwarding may cross address families.
    assert [(b.address.version, b.port, b.weight) for b in svc.backends] == [(4, 53, 5), (6, 53, 0)]
    assert svc.health == model.HealthSettings(
        enabled=False, connect_deadline_floor=0.1, connect_deadline_multiple=3.0, connect_history_min=50,
        failure_threshold=5, max_quarantined=1,
        quarantine_weight=1, probe_backoff_initial=0.5, probe_backoff_factor=1.5, probe_backoff_max=60.0,
        probe_jitter=0.0, rise=3, slow_start=20.0, slow_start_initial_fraction=0.25, probation=60.0,
        udp_reply_window=2.0)
    assert all(type(getattr(svc.health, f)) is float for f in ("connect_deadline_multiple", "probation"))


def test_empty_metrics_address_disables_metrics():
    assert config.parse("settings: {metrics_address: ''}\nservices: []\n", "c.yaml").settings.metrics_address == ""


def test_null_sections_mean_defaults():
    text = "settings:\n  sysctls:\n  tracer:\nservices:\n"
    assert config.parse(text, "c.yaml") == model.Config()


def test_yaml_merge_keys_are_not_duplicates():
    text = """\
        services:
          - &web {name: web, vip: 10.0.0.1, port: 80, backends: [10.0.1.1]}
          - {<<: *web, name: web2, port: 81}
        """
    web, web2 = config.parse(textwrap.dedent(text), "c.yaml").services
    assert (web2.name, web2.vip, web2.port) == ("web2", web.vip, 81)
    assert [(str(b.address), b.port) for b in web2.backends] == [("10.0.1.1", 81)]


def test_every_model_field_is_configurable():
    """A field added to the model without a key here would silently keep its default."""
    pairs = [(model.Settings, config._SETTINGS), (model.Sysctls, config._SYSCTLS),
             (model.TracerSettings, config._TRACER), (model.HealthSettings, config._HEALTH),
             (model.Service, config._SERVICE), (model.Backend, config._BACKEND), (model.Config, config._CONFIG)]
    for cls, spec in pairs:
        live = {key for key, field in spec.items() if field.default is not dataclasses.MISSING}  # not removed
        assert live == {f.name for f in dataclasses.fields(cls)}, cls.__name__


def test_every_key_is_documented():
    doc = (ROOT / "docs/configuration.md").read_text()
    for spec in (config._SETTINGS, config._SYSCTLS, config._TRACER, config._SERVICE, config._BACKEND,
                 config._HEALTH):
        for key, field in spec.items():
            if field.default is not dataclasses.MISSING:  # a removed key is refused, not documented
                assert f"| `{key}` |" in doc, key


# --- fuzz: nothing but ConfigError, ever ---------------------------------------------------

def parses_or_config_error(text: str) -> None:
    try:
        cfg = config.parse(text, "fuzz.yaml")
    except config.ConfigError as err:
        assert err.messages and all(m.startswith("fuzz.yaml: ") and "\n" not in m for m in err.messages)
    else:
        assert isinstance(cfg, model.Config)


YAML_TOKENS = ["services:", "settings:", "\n", "  ", "- ", ": ", "[", "]", "{", "}", ",", "&a ", "*a", "<<: ",
               "!!int ", "!!bool ", "!!timestamp ", "!!float ", "!!binary ", "!!set ", "!!python/tuple ", "? ",
               "'", '"', "#", "|", ">", "---\n", "...\n", "%YAML 1.1\n", "~", "null", "true", "0x", "1:30",
               "2024-02-30", ".nan", "-.inf", "10.0.0.1", "fd00::1", "name", "vip", "port", "backends",
               "health", "\t", "\\", "\x00", "\ufeff"]

yaml_like_text = st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=4), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.text() | yaml_like_text)
def test_fuzz_arbitrary_text(text):
    parses_or_config_error(text)


scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2, max_value=70000)
           | st.floats() | st.text(max_size=12) | st.binary(max_size=4) | st.dates()
           | st.sampled_from(["10.0.0.1", "fd00::1", "10.0.0.1:80", "[fd00::1]:80", "tcp", "udp", "wlc",
                              "auto", "sh-port", "masq", "tunnel"]))
keys = st.sampled_from([f.name for cls in (model.Config, model.Settings, model.Sysctls, model.TracerSettings,
                                           model.Service, model.Backend, model.HealthSettings)
                        for f in dataclasses.fields(cls)]) | st.text(max_size=6) | st.integers()
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk)
def test_fuzz_arbitrary_structures(doc):
    parses_or_config_error(yaml.safe_dump(doc))


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly plausible values, sometimes anything, so the deep checks get exercised."""
    return valid | valid | junk


backend = maybe(st.fixed_dictionaries({}, optional={
    "address": maybe(st.sampled_from(["10.0.1.1", "10.0.1.2", "fd00::2", "x"])),
    "port": maybe(st.integers(0, 70000)),
    "weight": maybe(st.integers(-1, 70000)),
}) | st.sampled_from(["10.0.1.1", "10.0.1.1:80", "[fd00::2]:80", "fd00::3", "[", "1.2.3.4:0"]))
health = st.fixed_dictionaries({}, optional={
    f.name: maybe(st.one_of(st.none(), st.integers(-1, 100), st.floats(-1, 100)))
    for f in dataclasses.fields(model.HealthSettings)})
service = st.fixed_dictionaries({}, optional={
    "name": maybe(st.sampled_from(["a", "b", "bad name"])),
    "protocol": maybe(st.sampled_from(["tcp", "udp"])),
    "vip": maybe(st.sampled_from(["10.0.0.1", "fd00::1"])),
    "port": maybe(st.integers(0, 70000)),
    "scheduler": maybe(st.sampled_from(model.SCHEDULERS)),
    "persistence_timeout": maybe(st.integers(-1, 1000)),
    "forwarding": maybe(st.sampled_from(["masq", "route", "tunnel"])),
    "scheduler_flags": maybe(st.lists(st.sampled_from(model.SCHEDULER_FLAGS), max_size=3)),
    "backends": maybe(st.lists(backend, max_size=4)),
    "health": maybe(health),
})
config_like = st.fixed_dictionaries({}, optional={"services": maybe(st.lists(service, max_size=3)),
                                                  "settings": junk})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_like)
def test_fuzz_config_shaped_structures(doc):
    parses_or_config_error(yaml.safe_dump(doc))


# --- fuzz: hostile sizes, numbers, nesting and files, each within a time bound -------------

def huge_literal(sign: str, form: str, digits: str, length: int) -> str:
    """A literal of `length` digits (beyond 64 bits in every base) built from `digits`."""
    alphabet = {"dec": "123456789", "hex": "123456789abcdef", "bin": "1", "oct": "1234567"}[form]
    body = "".join(alphabet[ord(c) % len(alphabet)] for c in digits) * (length // len(digits) + 1)
    prefix = {"dec": "", "hex": "0x", "bin": "0b", "oct": "0"}[form]  # YAML 1.1 octal: a leading 0
    return sign + prefix + body[:length]


# 66 to 30 000 digits: beyond 64 bits in every base; up to 100 characters they are
# converted and measured, longer ones refused on their length.
huge_integers = st.builds(huge_literal, st.sampled_from(["", "-", "+"]), st.sampled_from(["dec", "hex", "bin", "oct"]),
                          st.text(min_size=1, max_size=30), st.integers(66, 30000))
INTEGER_FIELDS = ["port: {}", "persistence_timeout: {}", "health: {{rise: {}}}", "health: {{max_quarantined: {}}}",
                  "health: {{probation: {}}}", "scheduler_flags: [{}]"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(huge_integers, st.sampled_from(INTEGER_FIELDS))
def test_fuzz_integers_beyond_64_bits_are_named_not_converted(literal, field):
    text = SERVICE.replace("    port: 80\n", "    " + field.format(literal) + "\n" if "port" in field else
                           "    port: 80\n    " + field.format(literal) + "\n")
    started = time.monotonic()
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, "fuzz.yaml")
    assert time.monotonic() - started < 2
    (line,) = err.value.messages
    assert "integer beyond 64 bits: got " in line and len(line) < 300, line


nesting = st.lists(st.sampled_from(["[", "{a: ", "- ", "? ", "&x [", "!!seq ["]), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nesting, st.integers(min_value=1, max_value=30000), st.booleans())
def test_fuzz_deep_nesting(openers, depth, closed):
    text = "services: " + "".join(openers[i % len(openers)] for i in range(depth))
    if closed:
        text += "1" + "".join("]" if o.endswith("[") else "}" if o.startswith("{") else "" for o in
                              (openers[i % len(openers)] for i in reversed(range(depth))))
    with within(20):
        parses_or_config_error(text)


file_kinds = st.sampled_from(["bytes", "oversized", "FIFO", "directory", "socket", "/dev/zero", "/dev/urandom",
                              "/dev/null", "dangling", "loop"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(file_kinds, st.binary(max_size=200))
def test_fuzz_special_and_big_files(tmp_path, kind, data):
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    path = directory / "config.yaml"
    if kind == "bytes":
        path.write_bytes(data)
    elif kind == "oversized":
        path.write_bytes(data * (config.MAX_FILE_BYTES // max(1, len(data))) + b"x" * (config.MAX_FILE_BYTES + 1))
    elif kind == "dangling":
        path.symlink_to(directory / "absent")
    elif kind == "loop":
        path.symlink_to(path)
    else:
        path = special_file(directory, kind)
    with within(10):
        try:
            cfg = config.load(path)
        except config.ConfigError as err:
            assert err.messages and all(m.startswith(f"{path}: ") and "\n" not in m for m in err.messages)
        else:
            assert kind == "bytes" and isinstance(cfg, model.Config)
