"""What every test-bed VM launcher shares: the one-VM-at-a-time lock, free ports, a fresh
copy of a guest root, the VM in its own process group, and the watch on the guest kernel's
console that ends a run within seconds of a panic, Oops or BUG.

Used by testbed/run_vm.py (kernel tests), packaging/vm-install-test (package install test)
and molecule/common/vm.py (Molecule's VMs).

A guest kernel that died is judged once, here (`Death`): when it died of an int3 that is not
in its memory (`emulator_fault`), QEMU's emulation broke it and the launcher runs it once
more from a clean state; any other death fails the run with the kernel's crash lines.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import kernels

REPO = kernels.REPO
CACHE = kernels.CACHE
RESULTS = CACHE / "results"


def vng(who: str) -> tuple[str, dict[str, str]]:
    """virtme-ng's `vng` from the test bed's venv, and an environment that finds its helpers."""
    found = shutil.which("vng", path=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise SystemExit(f"{who}: vng not found; run `make venv` first")
    return found, dict(os.environ, PATH=f"{Path(found).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def vm_lock(who: str, shared: bool = False):
    """One TCG VM at a time on this machine: two at once on two cores made both slow and
    turned timing tests flaky. Launchers queue here (unless `shared`); the lock lasts as long
    as the returned file (or a copy of its descriptor handed to a VM) stays open."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    handle = (RESULTS / ".vm.lock").open("w")
    if shared:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{who}: another VM is running on this machine; waiting for it", flush=True)
        started = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        print(f"{who}: waited {time.monotonic() - started:.0f} s for the VM lock", flush=True)
    return handle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Trees of a guest root that the guest never writes: hard links instead of copies.
SHARED_TREES = (Path("usr/lib/modules"), Path("usr/src"))


def copy_root(base: Path, dest: Path) -> Path:
    """A fresh copy of `base` at `dest` (cp -a), the kernel's modules and headers hard-linked,
    so each run starts from a clean system in seconds."""
    shutil.rmtree(dest, ignore_errors=True)

    def copy_level(rel: Path) -> None:
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for entry in sorted((base / rel).iterdir()):
            sub = rel / entry.name
            if sub in SHARED_TREES:
                subprocess.run(["cp", "-al", str(entry), str(dest / sub)], check=True)
            elif any(s.is_relative_to(sub) for s in SHARED_TREES) and entry.is_dir() and not entry.is_symlink():
                copy_level(sub)
            else:
                subprocess.run(["cp", "-a", str(entry), str(dest / sub)], check=True)
        shutil.copystat(base / rel, dest / rel)

    copy_level(Path("."))
    return dest


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """vng starts virtme-run, which starts QEMU: a VM is stopped by its whole process group
    (killing vng alone once left a QEMU running for half an hour)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- The guest kernel's console ------------------------------------------------------------

# The guest kernel's own account of its death (console lines carry its "[ time]" prefix, so a
# program printing "BUG:" is not taken for the kernel).
CRASH_LINE = re.compile(r"\] (Oops: .*|BUG: .*|RIP: 0010:.*|Kernel panic - .*)$")
DEATH_START = re.compile(r"\] (Oops: |BUG: |Kernel panic - )")
# After these the kernel has said all it will: the panic, or the end of the oops's report.
DEATH_SAID = re.compile(r"\] (Kernel panic - |---\[ end (trace|Kernel panic))")
# The byte before the trapping address and the byte at it, in an oops's `Code:` line.
CODE_AT = re.compile(r"Code: (?:[0-9a-f]{2} )*([0-9a-f]{2}) <([0-9a-f]{2})>")


def crash_lines(printed: Iterable[str]) -> list[str]:
    """The guest kernel's crash lines: the first of each kind (Oops/BUG, where, the panic)."""
    crash: list[str] = []
    for line in printed:
        found = CRASH_LINE.search(line)
        if found and not any(c.split(":")[0] == found.group(1).split(":")[0] for c in crash):
            crash.append(found.group(1))
    return crash


def emulator_fault(printed: Sequence[str]) -> str | None:
    """Whether the guest kernel died of an int3 that is not in its memory. The kernel patches
    its own text (static keys when tracing is switched on or off, ftrace for kprobes) with a
    temporary int3, and QEMU's TCG can run the other vCPU on the bytes from before the patch
    finished. The oops's `Code:` line shows memory around the address after the trap, the
    byte there in <>: when the byte before it is no int3 (0xcc), the CPU trapped on code that
    memory no longer held, which hardware does not do. An int3 still in memory is the
    guest's own and is not excused."""
    crash = crash_lines(printed)
    if not any(line.startswith("Oops: int3") for line in crash):
        return None
    code = next(filter(None, map(CODE_AT.search, printed)), None)
    if code is None or code.group(1) == "cc":
        return None
    where = next((line for line in crash if line.startswith("RIP:")), "")
    return " ".join(filter(None, ["Oops: int3", where])) + ", no int3 in memory there"


@dataclass(frozen=True)
class Death:
    """A guest kernel's death as its console told it."""
    crash: list[str]          # its crash lines
    fault: str | None         # the emulator fault it was, if it was one (then: run once more)

    def why(self) -> str:
        return "guest kernel died: " + "; ".join(self.crash)

    def rerun_note(self, kept_log: Path) -> str:
        return f"first run died of an emulator fault ({self.fault}; its log: {kept_log}), ran once more"


def death(printed: Sequence[str]) -> Death | None:
    crash = crash_lines(printed)
    if not any(DEATH_START.search(f"] {line}") for line in crash):
        return None
    return Death(crash, emulator_fault(printed))


def once_more(started: bool, finished: bool, timed_out: bool, died: Death | None) -> str | None:
    """Why a run is to run once more from a clean state, or None. Only when nothing of it can
    be trusted and the guest is not to blame: the VM ended before its guest started
    anything, without a word from the guest kernel (QEMU's TCG has segfaulted while booting
    on these machines), or the guest kernel died of an emulator fault before the test
    finished. A launcher does this once; a second such end is judged by `judge`."""
    if not started and not timed_out and died is None:
        return "the VM ended before its guest started"
    if not finished and died is not None and died.fault:
        return f"the guest died of an emulator fault ({died.fault})"
    return None


def judge(finished: bool, died: Death | None) -> tuple[str | None, str | None]:
    """What a guest kernel's death means for a run: (why it failed, or None; a note for the
    summary, or None). A death of the guest's own fails the run whenever it happens (an
    Oops after the test finished is still a kernel bug the test provoked); an emulator fault
    after the test finished leaves the result standing and is noted; one before that fails
    (it is the second: the first was run once more)."""
    if died is None:
        return None, None
    if finished and died.fault:
        return None, f"the guest died of an emulator fault after the test finished ({died.fault})"
    return died.why() + (" after the test finished" if finished else ""), None


class Console:
    """The console lines seen so far and whether they tell of the guest kernel's death. The
    death is settled once the kernel has said all it will (its panic, or one second after
    the end of the oops's report, so that a panic following the oops is read too), or
    `grace` seconds after the first crash line if it stops mid-report."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, grace: float = 10.0, settle: float = 1.0):
        self.lines: list[str] = []
        self._clock, self._grace, self._settle = clock, grace, settle
        self._first_at: float | None = None
        self._said_at: float | None = None
        self._panic = False
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        with self._lock:
            self.lines.append(line)
            if self._first_at is None and DEATH_START.search(line):
                self._first_at = self._clock()
            if self._first_at is not None and DEATH_SAID.search(line):
                self._said_at = self._said_at or self._clock()
                self._panic |= "Kernel panic - " in line

    def dead(self) -> bool:
        with self._lock:
            if self._first_at is None:
                return False
            now = self._clock()
            return (self._panic or (self._said_at is not None and now - self._said_at >= self._settle)
                    or now - self._first_at >= self._grace)

    def death(self) -> Death | None:
        with self._lock:
            return death(list(self.lines))


class Vm:
    """One VM (vng) in its own process group. What it prints (vng, QEMU and, with a serial
    console on stdout, the guest kernel's console) is appended to `console_log` as it comes
    and fed to `console`. (A pipe, not the file itself: QEMU reopens /proc/self/fd/N of a
    file chardev with O_TRUNC, so writers sharing a file overwrite each other.)"""

    def __init__(self, argv: list[str], env: dict[str, str], console_log: Path, pass_fds: Sequence[int] = ()):
        self.console = Console()
        self.log_path = console_log
        self._log = console_log.open("a", errors="replace")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, pass_fds=tuple(pass_fds))
        self._pump = threading.Thread(target=self._copy, daemon=True)
        self._pump.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self._log.write(line)
            self._log.flush()
            self.console.feed(line)

    def watch(self, timeout: float, until: Callable[[], bool] = lambda: False, poll: float = 0.5) -> str:
        """Wait until `until()` holds ("done"), the VM exits ("exited"), its guest kernel dies
        ("died": the VM is then killed), or `timeout` seconds pass ("timeout": it runs on)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.console.dead():
                self.kill()
                return "died"
            if until():
                return "done"
            if self.proc.poll() is not None:
                self._pump.join(5)  # the last lines, which may tell why
                return "died" if self.console.dead() or self.console.death() else "exited"
            if time.monotonic() >= deadline:
                return "timeout"
            time.sleep(poll)

    def kill(self) -> None:
        kill_group(self.proc.pid)
        self.close()

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to the group, SIGKILL if it is not gone after `grace` seconds."""
        if self.proc.poll() is None:
            kill_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def close(self) -> None:
        self.proc.wait()
        self._pump.join(5)
        if not self._pump.is_alive():
            self._log.close()

    def note(self, text: str) -> None:
        """A line of the launcher's own in the console log (how the VM ended)."""
        if not self._log.closed:
            self._log.write(f"--- {text}\n")
            self._log.flush()
        else:
            with self.log_path.open("a") as f:
                f.write(f"--- {text}\n")


def follow(path: Path, console: Console, stop: Callable[[], bool], poll: float = 0.5) -> None:
    """Feed `console` the lines of a file that another process writes (a detached VM's
    console log), until `stop()` holds or the guest kernel has died."""
    offset, partial = 0, b""
    while not stop() and not console.dead():
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                console.feed(line.decode(errors="replace"))
        time.sleep(poll)


# --- How often guests die, from the logs in the results directory ------------------------

def boots(console_log: Path) -> list[list[str]]:
    """The console of each boot in a log: run_vm appends each boot's output and a "--- how
    it ended" line to one vng.log; the other launchers write one log per boot."""
    found: list[list[str]] = [[]]
    for line in console_log.read_text(errors="replace").splitlines():
        if line.startswith("--- "):
            found.append([])
        else:
            found[-1].append(line)
    return [boot for boot in found if any(line.strip() for line in boot)]


def census(results: Path = RESULTS) -> dict[str, dict[str, int]]:
    """Per launcher (kernel tests, package test, Molecule): boots, guest kernel deaths and
    emulator faults in the console logs under `results`."""
    counts: dict[str, dict[str, int]] = {}
    for run in sorted(p for p in results.iterdir() if p.is_dir() and not p.is_symlink()):
        logs = sorted(run.glob("vng.log*"))
        if not logs:  # never booted (waited for the lock and was stopped)
            continue
        kind = "package test" if run.name.startswith("pkgtest-") else (
            "Molecule" if run.name.startswith("molecule-") else "kernel tests")
        row = counts.setdefault(kind, {"runs": 0, "boots": 0, "deaths": 0, "emulator faults": 0})
        row["runs"] += 1
        for log in logs:
            for printed in boots(log):
                died = death(printed)
                row["boots"] += 1
                row["deaths"] += died is not None
                row["emulator faults"] += died is not None and died.fault is not None
    return counts


if __name__ == "__main__":
    import sys

    where = Path(sys.argv[2]) if len(sys.argv) > 2 else RESULTS
    if sys.argv[1:2] != ["census"]:
        raise SystemExit("usage: testbed/vmlib.py census [RESULTS_DIR]   # boots, deaths, emulator faults")
    print("| launcher | runs | boots | guest kernel deaths | of which emulator faults |\n|---|---:|---:|---:|---:|")
    for kind, row in census(where).items():
        print(f"| {kind} | {row['runs']} | {row['boots']} | {row['deaths']} | {row['emulator faults']} |")
