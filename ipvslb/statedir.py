"""One daemon per state directory: `<state_dir>/lock`, held with flock for the process's
life. Two daemons on one host would undo each other's IPVS changes and overwrite each
other's ownership record. The kernel drops the lock when the process ends, however it
ends (kill -9 too), so a stale file never blocks a restart."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

FILENAME = "lock"


class Locked(RuntimeError):
    """Another process holds the lock; the message names its PID."""


def lock(state_dir: str | os.PathLike) -> StateLock:
    path = Path(state_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Locked(f"another ipvslb (PID {holder}) runs with state directory {state_dir}; "
                     "stop it first, or give this one another settings.state_dir") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(fd)


class StateLock:
    def __init__(self, fd: int):
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_json(path: Path, doc: object) -> None:
    """`doc` at `path`, atomically and durably: a temporary name of its own (never one
    another writer shares), the data on disk before the rename, the rename on disk before
    the caller goes on (a crash leaves the old file or the new one, never a mix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with open(fd, "w") as f:
            f.write(_dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _dumps(doc: object) -> str:
    """JSON with a line per top-level key, for a reader; from json's C encoder (indent=
    encodes in Python, ten times slower, and a reload writes the ownership record of
    every service)."""
    if not isinstance(doc, dict):
        return json.dumps(doc) + "\n"
    return "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in doc.items()) + "\n}\n"
