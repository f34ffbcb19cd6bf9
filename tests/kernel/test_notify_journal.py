"""A health transition on a real kernel, told to the operator both ways: the notify hook
(settings.notify_command) runs with the transition in its environment, and the log line
reaches journald with its fields, so `journalctl IPVSLB_BACKEND=...` finds it. The guest has
no systemd: the test starts a journald of its own and runs the daemon with its stderr on a
journal stream and JOURNAL_STREAM naming it, as the packaged unit does."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.conftest import ipvsadm
from tests.kernel.daemonproc import SOCKET, WORK, DaemonProcess, endpoint, wait_for, write_config

pytestmark = pytest.mark.one_kernel

JOURNALD = Path("/lib/systemd/systemd-journald")
NOTES = WORK / "notes"
# The daemon as systemd starts a unit's main process: stderr a journal stream (systemd-cat
# connects it), JOURNAL_STREAM its device and inode.
LAUNCH = ("import os, sys; st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; "
          "os.execv(sys.executable, [sys.executable, '-m', 'ipvslb', 'run', '--config', sys.argv[1]])")


def journal(*matches: str) -> list[dict]:
    """This boot's entries (the guest's /var/log/journal may hold the host's)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", f"_BOOT_ID={boot}", *matches],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def notes() -> list[dict[str, str]]:
    """The environments the hook saw, oldest first."""
    found = []
    for path in sorted(NOTES.glob("*.env"), key=lambda p: p.stat().st_mtime_ns):
        text = path.read_text()
        if text.endswith("END\n"):  # written in full
            found.append(dict(line.split("=", 1) for line in text.splitlines()[:-1]))
    return found


class JournalDaemon(DaemonProcess):
    def start(self, timeout: float = 600) -> None:
        if SOCKET.exists():
            SOCKET.unlink()
        self.proc = subprocess.Popen(["systemd-cat", "-t", "ipvslb", sys.executable, "-c", LAUNCH, str(self.config)])
        deadline = time.monotonic() + timeout
        while not SOCKET.exists():
            assert self.proc.poll() is None, f"daemon exited: {self.log()}"
            assert time.monotonic() < deadline, "daemon did not come up"
            time.sleep(0.2)

    def log(self) -> str:
        return subprocess.run(["journalctl", "--no-pager", "-o", "cat", "SYSLOG_IDENTIFIER=ipvslb"],
                              capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def journald():
    if not JOURNALD.exists():
        pytest.skip("no systemd-journald in the guest")
    Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(JOURNALD)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: Path("/run/systemd/journal/stdout").exists(), 30, "journald's sockets")
    yield
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def hooked(journald, _session_topology):
    topo = _session_topology
    topo.reset()
    ipvsadm("-C")
    NOTES.mkdir(parents=True, exist_ok=True)
    hook = WORK / "hook.sh"
    hook.write_text(f'f={NOTES}/$$.env; env | grep "^IPVSLB_" > "$f.part"; echo END >> "$f.part"; mv "$f.part" "$f"\n')
    config = write_config(topo.backends)
    config.write_text(config.read_text().replace(
        "settings:\n", f"settings:\n  notify_command: [/bin/sh, {hook}]\n  notify_timeout: 5\n", 1))
    d = JournalDaemon(config)
    d.start()
    yield d
    d.kill()
    print(d.log()[-4000:])


def test_a_quarantine_runs_the_hook_and_is_found_in_the_journal_by_its_backend(hooked, clients, _session_topology):
    b, other = _session_topology.backends[0], _session_topology.backends[1]
    ep = endpoint(b)
    wait_for(lambda: all(r["state"] == "healthy" and r["probation_until"] is None
                         for r in hooked.backends().values()), 120, "every backend healthy")
    for path in NOTES.glob("*"):
        path.unlink()
    client = clients(rate=20)
    b.set_mode("refuse")
    wait_for(lambda: hooked.backends()[ep]["state"] in ("quarantined", "probing"), 30, "quarantined")
    # The first quarantine; probes that fail while it refuses may quarantine it again.
    seen = wait_for(lambda: [n for n in notes() if n["IPVSLB_NEW_STATE"] == "quarantined"], 15,
                    "the hook told of the quarantine")[0]
    assert seen["IPVSLB_SERVICE"] == "web" and seen["IPVSLB_BACKEND"] == ep
    assert seen["IPVSLB_OLD_STATE"] in ("healthy", "suspect") and seen["IPVSLB_EVIDENCE"]

    entry = wait_for(lambda: [e for e in journal(f"IPVSLB_BACKEND={ep}") if e.get("IPVSLB_STATE") == "quarantined"],
                     15, "the transition in the journal")[0]
    assert entry["IPVSLB_SERVICE"] == "web" and entry["_TRANSPORT"] == "journal"
    assert entry["MESSAGE"] == f"web {ep}: {seen['IPVSLB_OLD_STATE']} -> quarantined: {seen['IPVSLB_EVIDENCE']}"
    assert entry["PRIORITY"] == "4"
    assert journal(f"IPVSLB_BACKEND={endpoint(other)}") == []
    # Lines without fields go to the journal too, with their priority.
    assert journal("SYSLOG_IDENTIFIER=ipvslb", "PRIORITY=6")

    b.set_mode("accept")
    wait_for(lambda: hooked.backends()[ep]["state"] == "healthy", 120, "healthy again")
    wait_for(lambda: (told := notes()) and told[-1]["IPVSLB_NEW_STATE"] == "healthy", 15, "the hook told of the return")
    states = [e["IPVSLB_STATE"] for e in journal(f"IPVSLB_BACKEND={ep}")]
    assert states[-1] == "healthy" and "quarantined" in states
    print(f"transitions of {ep}: {states}; hook runs: {len(notes())}")
    client.stop()
