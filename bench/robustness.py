"""Hostile inputs against `ipvslb check-config`, `ipvslb status` and the status server:
runs each as its own process, with a time limit and an address-space limit, and prints
the Markdown table of docs/robustness.md.

    python3 bench/robustness.py [--root DIR] [--timeout S] [--only SUBSTRING]

`--root` is the source tree whose `ipvslb` package runs (default: this checkout). Needs
no root and no kernel features; everything lives in a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 2 << 30  # a parser that balloons is stopped, and counted as a failure

SERVICE = """\
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    backends: [10.0.1.1, 10.0.1.2]
"""


def service(vip="10.0.0.1", backends="[10.0.1.1, 10.0.1.2]", name="web", port="80") -> str:
    return f"services:\n  - name: {name}\n    vip: {vip}\n    port: {port}\n    backends: {backends}\n"


def many_services(count: int) -> str:
    lines = ["services:"]
    for i in range(count):
        lines.append(f"  - {{name: s{i}, vip: 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}, port: 80, "
                     f"backends: [192.168.0.1, 192.168.0.2]}}")
    return "\n".join(lines) + "\n"


def many_errors(count: int) -> str:
    return "services:\n" + "".join(f"  - {{name: s{i}, vip: 10.0.0.1, port: 0, backends: [x]}}\n"
                                   for i in range(count))


def config_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    """(description, argv after `ipvslb`) for each file; files are written here."""
    files: dict[str, str | bytes] = {
        "huge hexadecimal integer (5000 digits)": service(port="0x" + "f" * 5000),
        "huge binary integer (20 000 digits)": service(port="0b" + "1" * 20_000),
        "huge decimal integer (5000 digits)": service(port="9" * 5000),
        "huge octal integer (5000 digits)": service(port="0" + "7" * 5000),  # YAML 1.1 octal
        "huge sexagesimal integer": service(port="1" + ":59" * 2000),
        "integer 2**64": service(port=str(2**64)),
        "huge float literal (a duration)": SERVICE + "    health: {probation: 1.0e+999999}\n",
        "deep flow nesting (100 000 [)": "services: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "deep block nesting (1500 levels)": "services:\n" + "".join(" " * i + "- \n" for i in range(1, 1500)),
        "deep mapping nesting (20 000 {a:)": "services: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n",
        "alias bomb (billion laughs)": "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))
            + "services: *i\n",
        "8 MiB file of services": many_services(90_000),
        "100 000 errors (5.8 MB)": many_errors(100_000),
        "10 000 errors": many_errors(10_000),
        "60 errors": many_errors(60),
        "loopback VIP 127.0.0.1": service(vip="127.0.0.1"),
        "loopback VIP ::1": service(vip="'::1'", backends="['fd00::2']"),
        "broadcast VIP 255.255.255.255": service(vip="255.255.255.255"),
        "link-local VIP 169.254.1.1": service(vip="169.254.1.1"),
        "link-local VIP fe80::1": service(vip="'fe80::1'", backends="['fd00::2']"),
        "multicast VIP 224.0.0.1": service(vip="224.0.0.1"),
        "unspecified VIP 0.0.0.0": service(vip="0.0.0.0"),
        "VIP equal to a backend": service(backends="[10.0.0.1, 10.0.1.2]"),
        "service name of 65 characters": service(name="n" * 65),
        "service name with a control character": service(name='"web\\x07"'),
        "service name with a newline": service(name='"web\\nx"'),
        "unknown key of 100 000 characters": SERVICE + "k" * 100_000 + ": 1\n",
        "value of 1 MB": service(backends="x" * 1_000_000),
        "NUL byte": SERVICE + "\0\n",
        "not UTF-8": SERVICE.encode() + b"\xff\xfe\n",
        "UTF-8 byte order mark": "\ufeff" + SERVICE,
        "python/object tag": "services: !!python/object:os.system [echo]\n",
        "impossible date": "services: 2024-02-30\n",
        "!!int on a non-number": "services: !!int abc\n",
        "tab indentation": "services:\n\t- name: web\n",
        "empty file": "",
        "top level a list": "- 1\n- 2\n",
        "duplicate keys": SERVICE.replace("port: 80", "port: 80\n    port: 81"),
        "settings.status_socket in /tmp": "settings: {status_socket: /tmp/ipvslb.sock}\n" + SERVICE,
        "settings.state_dir in /srv": "settings: {state_dir: /srv/ipvslb}\n" + SERVICE,
    }
    cases = []
    for i, (name, content) in enumerate(files.items()):
        path = tmp / f"c{i}.yaml"
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        cases.append((name, ["check-config", str(path)]))
    fifo = tmp / "fifo.yaml"
    os.mkfifo(fifo)
    zero = tmp / "zero.yaml"
    zero.symlink_to("/dev/zero")
    loop = tmp / "loop.yaml"
    loop.symlink_to(loop)
    directory = tmp / "dir.yaml"
    directory.mkdir()
    big = tmp / "big.yaml"
    big.write_text(many_services(600_000))  # about 50 MB
    cases += [("FIFO", ["check-config", str(fifo)]),
              ("symlink to /dev/zero", ["check-config", str(zero)]),
              ("/dev/null", ["check-config", "/dev/null"]),
              ("directory", ["check-config", str(directory)]),
              ("symlink loop", ["check-config", str(loop)]),
              ("missing file", ["check-config", str(tmp / "absent.yaml")]),
              (f"50 MB file of services ({big.stat().st_size // 1_000_000} MB)", ["check-config", str(big)])]
    return cases


# --- status: fake daemons that answer badly ----------------------------------------------

def fake_daemon(path: Path, answer: bytes | None, hold: float = 0.0) -> threading.Thread:
    """A unix socket at `path` that sends `answer` (None: accepts and says nothing)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def serve() -> None:
        with server:
            server.settimeout(60)
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                if answer is not None:
                    conn.sendall(answer)
                time.sleep(hold)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def status_cases(tmp: Path) -> list[tuple[str, list[str], Path | None, bytes | None, float]]:
    """(description, argv, socket path to serve or None, answer, hold seconds)."""
    def sock(n: int) -> Path:
        return tmp / f"s{n}.sock"

    regular = tmp / "regular.sock"
    regular.write_text("not a socket")
    stale = tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: ECONNREFUSED
    return [
        ("status: no socket", ["status", "--socket", str(tmp / "absent.sock")], None, None, 0),
        ("status: socket nobody listens on", ["status", "--socket", str(stale)], None, None, 0),
        ("status: regular file at the path", ["status", "--socket", str(regular)], None, None, 0),
        ("status: answer not JSON", ["status", "--socket", str(sock(1))], sock(1), b"hello\n", 0),
        ("status: answer a JSON list", ["status", "--socket", str(sock(2))], sock(2), b"[1, 2]\n", 0),
        ("status: answer with wrong types", ["status", "--socket", str(sock(3))], sock(3),
         json.dumps({"services": [{"name": 1, "backends": "x"}]}).encode(), 0),
        ("status: connection closed without an answer", ["status", "--socket", str(sock(4))], sock(4), b"", 0),
        ("status: answer never comes", ["status", "--socket", str(sock(5))], sock(5), None, 30),
        ("status: answer not UTF-8", ["status", "--socket", str(sock(6))], sock(6), b"\xff\xfe{}\n", 0),
    ]


def server_case(tmp: Path) -> tuple[str, list[str]]:
    """The status server given a path that holds a regular file: must refuse, not unlink."""
    victim = tmp / "victim"
    victim.write_text("precious\n")
    code = textwrap.dedent(f"""\
        import asyncio, os, sys
        from ipvslb import status
        try:
            asyncio.run(status.serve({str(victim)!r}, dict))
            refused = False
        except status.SocketPathTaken as err:
            print(err, file=sys.stderr)
            refused = True
        except AttributeError:  # a version without the check
            refused = False
        kept = os.path.isfile({str(victim)!r}) and open({str(victim)!r}).read() == "precious\\n"
        print("file kept" if kept else "file replaced by the socket", file=sys.stderr)
        sys.exit(1 if kept and refused else 0)  # exit 1: refused, as check-config refuses
        """)
    return "status server: regular file at the socket path", ["-c", code]


# --- running -----------------------------------------------------------------------------

def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run(root: Path, argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, *argv] if argv[0] == "-c" else [sys.executable, "-m", "ipvslb", *argv]
    env = dict(os.environ, PYTHONPATH=str(root))
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=root,
                            preexec_fn=limit_memory, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        hung = True
    seconds = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = (err or b"").decode(errors="replace") + (out or b"").decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    traceback = "Traceback (most recent call last)" in text
    if hung:
        outcome = f"HANG (killed after {timeout:.0f} s)"
    elif traceback:
        outcome = "TRACEBACK: " + (lines[-1] if lines else "")
    elif proc.returncode == 0:
        outcome = "accepted"
    else:
        outcome = "refused"
    first = lines[0] if lines else ""
    return {"code": proc.returncode, "lines": len(lines), "seconds": seconds, "outcome": outcome,
            "first": first, "traceback": traceback, "hung": hung, "maxrss": usage.ru_maxrss}


def shorten(text: str, limit: int = 110) -> str:
    text = text.replace("|", "\\|").replace("`", "'")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ipvslb-robustness-") as name:
        tmp = Path(name)
        shown = {str(tmp): "$TMP"}
        cases: list[tuple[str, list[str], Path | None, bytes | None, float]] = [
            (n, a, None, None, 0.0) for n, a in config_cases(tmp)]
        cases += status_cases(tmp)
        cases.append((*server_case(tmp), None, None, 0.0))
        for description, argv, sock, answer, hold in cases:
            if args.only not in description:
                continue
            if sock is not None:
                fake_daemon(sock, answer, hold)
            result = run(args.root, argv, args.timeout)
            first = result["first"]
            for real, placeholder in shown.items():
                first = first.replace(real, placeholder)
            result["first"] = first
            rows.append((description, result))
            print(f"{description}: {result['outcome']} exit {result['code']} {result['lines']} lines "
                  f"{result['seconds']:.2f} s", file=sys.stderr, flush=True)
    print("| input | outcome | exit | lines | seconds | first line |")
    print("|---|---|---|---|---|---|")
    for description, r in rows:
        print(f"| {shorten(description, 60)} | {shorten(r['outcome'], 60)} | {r['code']} | {r['lines']} | "
              f"{r['seconds']:.2f} | {shorten(r['first'], 140)} |")
    bad = sum(1 for _, r in rows if r["traceback"] or r["hung"])
    print(f"\n{len(rows)} inputs, {sum(r['traceback'] for _, r in rows)} tracebacks, "
          f"{sum(r['hung'] for _, r in rows)} hangs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
