"""Notify hooks: the operator's command (settings.notify_command, an argv run without a
shell) is run on each health transition with the transition in its environment, as
keepalived runs its notify scripts.

A hook never delays a health decision: `Notifier.transition` only queues, the hooks run as
tasks on the daemon's loop, at most `limit` at once, each killed (its whole process group)
after `timeout` seconds. Beyond `limit`, notes wait in a bounded backlog; when it is full
the oldest note is dropped, because the newest transitions describe the backends as they
are now and a hook acting on a stale one (paging for a backend that is already back) helps
nobody.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Notes waiting for a free hook slot. A transition storm (a whole backend pool flapping)
# beyond this is summarised by a count of dropped notes.
BACKLOG = 64
# Bytes of a hook's stderr kept for the log line; the rest is read and discarded so that a
# chatty hook can neither block on a full pipe nor grow the daemon's memory.
STDERR_KEPT = 4096
# Seconds stderr is read on after the hook exited (its leftover children may keep it open).
STDERR_GRACE = 0.1


@dataclass(frozen=True)
class TransitionNote:
    """One backend's health transition, as hooks and journald fields see it."""

    service: str
    backend: str  # model.format_endpoint: 10.0.1.11:8443, [fd00::1]:80
    old: str
    new: str
    evidence: str

    def environment(self) -> dict[str, str]:
        return {"IPVSLB_SERVICE": self.service, "IPVSLB_BACKEND": self.backend,
                "IPVSLB_OLD_STATE": self.old, "IPVSLB_NEW_STATE": self.new,
                "IPVSLB_EVIDENCE": self.evidence}


class Notifier:
    """Runs `argv` once per transition note; `argv` None: notes are ignored."""

    def __init__(self, argv: tuple[str, ...] | None, timeout: float, limit: int, backlog: int = BACKLOG):
        if limit < 1 or backlog < 0:
            raise ValueError(f"notify limit must be >= 1 and backlog >= 0, got {limit} and {backlog}")
        self.argv = tuple(argv) if argv else None
        self.timeout = timeout
        self.limit = limit
        self._backlog: collections.deque[TransitionNote] = collections.deque()
        self._backlog_size = backlog
        self._running: set[asyncio.Task] = set()
        self._closed = False
        # Hooks that exited non-zero, could not be started or were killed at their timeout.
        self.failures = 0
        # Notes dropped from a full backlog (or still waiting at close).
        self.dropped = 0
        self._dropped_in_burst = 0

    def counters(self) -> dict[str, int]:
        """For the status snapshot and metrics (ipvslb_notify_*_total)."""
        return {"failures": self.failures, "dropped": self.dropped}

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._backlog)

    def transition(self, note: TransitionNote) -> None:
        """Queue one note; returns at once. Must be called on the running event loop."""
        loop = asyncio.get_running_loop()
        if self.argv is None or self._closed:
            return
        if len(self._running) < self.limit:
            self._start(loop, note)
            return
        self._backlog.append(note)
        if len(self._backlog) > self._backlog_size:
            dropped = self._backlog.popleft()
            self.dropped += 1
            self._dropped_in_burst += 1
            if self._dropped_in_burst == 1:
                log.warning("notify hook: %d running and %d waiting, dropping the oldest notes "
                            "(first: %s %s %s -> %s)", len(self._running), self._backlog_size,
                            dropped.service, dropped.backend, dropped.old, dropped.new)

    async def close(self) -> None:
        """At shutdown: drop the waiting notes, wait for the running hooks (each is killed at
        its timeout, so this ends within `timeout` and a little)."""
        self._closed = True
        if self._backlog:
            self.dropped += len(self._backlog)
            log.warning("notify hook: shutting down, %d waiting notes not run", len(self._backlog))
            self._backlog.clear()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _start(self, loop: asyncio.AbstractEventLoop, note: TransitionNote) -> None:
        task = loop.create_task(self._run(note))
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if self._closed:
            return
        if self._backlog:
            self._start(asyncio.get_running_loop(), self._backlog.popleft())
        elif self._dropped_in_burst:
            log.warning("notify hook: caught up; %d notes were dropped", self._dropped_in_burst)
            self._dropped_in_burst = 0

    async def _run(self, note: TransitionNote) -> None:
        try:
            await self._run_hook(note)
        except Exception:  # a bug here must not end the daemon's loop
            self.failures += 1
            log.exception("notify hook for %s %s: internal error", note.service, note.backend)

    async def _run_hook(self, note: TransitionNote) -> None:
        argv = self.argv
        assert argv is not None  # transition() queues nothing without a command
        what = f"notify hook {argv[0]} for {note.service} {note.backend} ({note.old} -> {note.new})"
        loop = asyncio.get_running_loop()
        # stderr through a pipe of our own, not asyncio's: a child the hook leaves behind may
        # hold it open, and asyncio's Process.wait() waits for its pipes as well as the exit.
        read_end, write_end = os.pipe()
        stderr = asyncio.StreamReader()
        pipe, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stderr),
                                               os.fdopen(read_end, "rb", buffering=0))
        kept = bytearray()
        reader = loop.create_task(_read_capped(stderr, kept))
        try:
            try:
                # A session of its own: at the timeout the whole group is killed, so that a
                # script's children die with it.
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end,
                    env={**os.environ, **note.environment()}, start_new_session=True)
            except (OSError, ValueError) as err:  # ValueError: a NUL in an argument
                self.failures += 1
                log.error("%s: cannot run: %s", what, getattr(err, "strerror", None) or err)
                return
            finally:
                os.close(write_end)
            try:
                async with asyncio.timeout(self.timeout):
                    code = await proc.wait()
            except TimeoutError:
                self.failures += 1
                _kill_group(proc.pid)
                log.error("%s: still running after %gs, killed", what, self.timeout)
                return
            except asyncio.CancelledError:
                _kill_group(proc.pid)
                raise
            # Exited; what it wrote is in the pipe, unless a child it left behind keeps writing.
            try:
                async with asyncio.timeout(STDERR_GRACE):
                    await asyncio.shield(reader)
            except TimeoutError:
                pass
        finally:
            reader.cancel()
            pipe.close()
        if code != 0:
            self.failures += 1
            first = kept.decode("utf-8", "replace").strip().splitlines()[:1]
            status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            log.error("%s: %s%s", what, status, f": {first[0]}" if first else "")


async def _read_capped(stream: asyncio.StreamReader, kept: bytearray) -> None:
    while chunk := await stream.read(65536):
        if len(kept) < STDERR_KEPT:
            kept += chunk[:STDERR_KEPT - len(kept)]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
