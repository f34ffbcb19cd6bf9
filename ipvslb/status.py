"""The status socket: a root-only unix socket that answers every connection with one JSON
document describing services and backends, and the `ipvslb status` table made from it."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from ipvslb.snapshot import SnapshotError, StatusSnapshot

# An answer larger than this is not from ipvslb (a daemon with 10 000 backends sends a few MB).
MAX_ANSWER_BYTES = 64 << 20


class SocketPathTaken(Exception):
    """Something other than a stale ipvslb socket is at the socket's path."""


class StatusError(ValueError):
    """The answer on the status socket is not a status document."""


def path_problem(path: str, setting: str = "status_socket") -> str | None:
    """Why the server of `settings.<setting>` could not take `path`, or None. Only a socket
    nobody answers on (left by a daemon that died) may be replaced: a regular file there is
    someone's data, and a socket that answers belongs to a running daemon."""
    what = setting.replace("_", " ")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"{what} {path}: {err.strerror or err}"
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) else "a file"
        return (f"{what} {path}: {kind} that is not a socket is at that path; "
                f"remove it or set settings.{setting} to another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return None  # stale: nobody listens
    return (f"{what} {path}: another process answers on it (a second `ipvslb run`?); "
            f"stop it or set settings.{setting} to another path")


async def serve(path: str, snapshot: Callable[[], dict]) -> asyncio.AbstractServer:
    """Raises SocketPathTaken (see path_problem) or OSError when the path cannot be used."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(snapshot(), default=str).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    return await listen(path, answer)


async def listen(path: str, handler: Callable, setting: str = "status_socket") -> asyncio.AbstractServer:
    """A unix socket server at `path` that only its owner (root) can connect to; the
    status and the control socket's. SocketPathTaken or OSError when the path cannot be used."""
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    problem = path_problem(path, setting)
    if problem:
        raise SocketPathTaken(problem)
    if sock_path.is_socket():
        sock_path.unlink()
    # umask rather than chmod after bind: no window in which others could connect.
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(handler, path=str(sock_path))
    finally:
        os.umask(old)


class AnswerTooLong(ValueError):
    pass


def ask(path: str, request: bytes, cap: int, timeout: float) -> bytes:
    """Send `request` (may be empty) to a daemon's Unix socket and read its whole answer, at
    most `cap` bytes (AnswerTooLong beyond). OSError when the socket cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        if request:
            s.sendall(request)
        chunks, size = [], 0
        while chunk := s.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise AnswerTooLong(f"answer longer than {cap >> 20} MiB")
    return b"".join(chunks)


def fetch(path: str, timeout: float = 5.0) -> dict:
    """The daemon's status document. OSError when it cannot be reached, StatusError when
    what answers is not an ipvslb status socket."""
    try:
        data = ask(path, b"", MAX_ANSWER_BYTES, timeout)
    except AnswerTooLong as err:
        raise StatusError(str(err)) from None
    if not data:
        raise StatusError("connection closed without an answer")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise StatusError(f"not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start}") from None
    except ValueError as err:  # JSONDecodeError, or a number too long to convert
        raise StatusError(f"not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise StatusError(f"not a status document: a JSON {type(doc).__name__}")
    return doc


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, now - ts)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def fetch_snapshot(path: str, timeout: float = 5.0) -> StatusSnapshot:
    """`fetch`, then `parse`: the running daemon's snapshot (OSError, StatusError)."""
    return parse(fetch(path, timeout))


def parse(doc: dict) -> StatusSnapshot:
    """The snapshot a status document (from `fetch`) describes. StatusError naming the key
    when it is not what this version sends (a daemon of another version, or not ipvslb)."""
    if set(doc) == {"error"}:   # the daemon could not build its snapshot (Daemon._status_snapshot)
        raise StatusError(f"the daemon reported: {doc['error']}")
    try:
        return StatusSnapshot.from_json(doc)
    except SnapshotError as err:
        raise StatusError(f"not a status document: {err}") from None


def render(snap: StatusSnapshot) -> str:
    """The human table: one block per service, one row per backend."""
    now = snap.now
    lines = [f"ipvslb {snap.version} pid {snap.pid}, attribution: {snap.attribution}, "
             f"lost tracer records: {snap.lost_records}, skipped tracer runs: {snap.missed_runs}, "
             f"connects counted without records: {snap.counted_successes}"]
    header = ("BACKEND", "STATE", "WEIGHT", "SINCE", "OK", "HARD", "SOFT", "QUAR", "LAST EVIDENCE")
    for svc in snap.services:
        freeze = f"  [FROZEN: {svc.freeze_reason or 'this host has no path'}]" if svc.frozen else ""
        lines.append("")
        lines.append(f"{svc.name}  {svc.protocol} {svc.vip}{freeze}")
        rows = [header]
        for b in svc.backends:
            c = b.counters
            # Drained: health's state goes on, IPVS has weight 0 until `ipvslb undrain`.
            state = f"{b.state} (drained)" if b.drained else str(b.state)
            rows.append((b.endpoint, state, f"{b.weight}/{b.configured_weight}", _ago(b.since, now),
                         str(c.successes), str(c.hard_failures), str(c.soft_failures), str(c.quarantines),
                         b.last_evidence or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        for r in rows:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return "\n".join(lines)
