"""Log destinations: journald (native, with fields) only when stderr is the stream systemd
named in JOURNAL_STREAM; the fields of a transition reach journald through `extra`."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipvslb import journal
from ipvslb.notify import TransitionNote

NOTE = TransitionNote("api", "10.0.1.11:8443", "healthy", "quarantined", "3 connects refused in 0.4 s")


def test_transition_fields():
    assert journal.transition_fields(NOTE) == {
        "IPVSLB_SERVICE": "api", "IPVSLB_BACKEND": "10.0.1.11:8443",
        "IPVSLB_STATE": "quarantined", "IPVSLB_EVIDENCE": "3 connects refused in 0.4 s"}


def stream_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path):
    with open(tmp_path / "stderr", "w") as f, open(tmp_path / "other", "w") as other:
        fd = f.fileno()
        assert journal.stderr_is_journal({"JOURNAL_STREAM": stream_id(fd)}, fd)
        # A wrapper redirected stderr elsewhere: the variable is stale.
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": stream_id(other.fileno())}, fd)
        assert not journal.stderr_is_journal({}, fd)
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd)


def test_the_journal_handler_sends_the_transition_fields():
    pytest.importorskip("systemd.journal")
    sent = []

    def send(MESSAGE, **fields):  # systemd.journal.send's signature; the record has a "message" too
        sent.append((MESSAGE, fields))

    handler = journal.make_handler(True, sender=send)
    log = logging.getLogger("ipvslb.test_journal")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("%s %s: %s -> %s: %s", NOTE.service, NOTE.backend, NOTE.old, NOTE.new, NOTE.evidence,
                    extra=journal.transition_fields(NOTE))
    finally:
        log.removeHandler(handler)
    ((message, fields),) = sent
    assert message == "api 10.0.1.11:8443: healthy -> quarantined: 3 connects refused in 0.4 s"
    assert fields["IPVSLB_BACKEND"] == "10.0.1.11:8443"
    assert fields["IPVSLB_SERVICE"] == "api"
    assert fields["IPVSLB_STATE"] == "quarantined"
    assert fields["IPVSLB_EVIDENCE"] == "3 connects refused in 0.4 s"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "ipvslb"


def test_without_python3_systemd_the_journal_gets_priority_prefixed_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # import fails
    handler = journal.make_handler(True)
    assert isinstance(handler, logging.StreamHandler)
    record = logging.LogRecord("ipvslb", logging.ERROR, __file__, 1, "cannot set weight %d", (3,), None)
    assert handler.format(record) == "<3>cannot set weight 3"


def test_elsewhere_plain_timestamped_lines():
    handler = journal.make_handler(False)
    record = logging.LogRecord("ipvslb", logging.WARNING, __file__, 1, "%s down", ("api",), None)
    line = handler.format(record)
    assert line.endswith(" WARNING api down")
    assert not line.startswith("<")


@pytest.mark.parametrize("under_systemd", [True, False])
def test_setup_logging_picks_the_handler_from_journal_stream(monkeypatch, under_systemd):
    pytest.importorskip("systemd.journal")
    from systemd.journal import JournalHandler
    if under_systemd:
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(2))
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    # basicConfig(force=True) closes the handlers it replaces: keep pytest's out of reach.
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        journal.setup_logging("debug")
        (handler,) = root.handlers
        assert isinstance(handler, JournalHandler) == under_systemd
        assert root.level == logging.DEBUG
        record = logging.LogRecord("ipvslb", logging.WARNING, __file__, 1, "%s down", ("api",), None)
        if under_systemd:  # journald has the priority and the time
            assert handler.format(record) == "api down"
        else:
            assert handler.format(record).endswith(" WARNING api down")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


ROOT = Path(__file__).resolve().parents[2]
JOURNALD = Path("/lib/systemd/systemd-journald")
# A journald of its own in a private mount namespace (tmpfs over its sockets and files, the
# host's journal untouched); the logging process's stderr is a journal stream, with
# JOURNAL_STREAM naming it as systemd does for a unit.
REAL_JOURNAL = r"""
set -eu
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal /run/log/journal
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
"$JOURNALD" >/dev/null 2>&1 &
journald=$!
trap 'kill $journald' EXIT
for _ in $(seq 100); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.05; done
systemd-cat -t ipvslb-test "$PYTHON" -c "$PROGRAM"
for _ in $(seq 100); do
  out=$(journalctl --no-pager -o json IPVSLB_BACKEND=10.0.1.11:8443)
  [ -n "$out" ] && break
  sleep 0.05
done
printf "%s\n" "$out"
"""
PROGRAM = """
import logging, os
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
from ipvslb import journal
from ipvslb.notify import TransitionNote
journal.setup_logging("info")
note = TransitionNote("api", "10.0.1.11:8443", "healthy", "quarantined", "RST in SYN_SENT (refused)")
logging.getLogger("ipvslb").warning("%s %s: %s -> %s: %s", note.service, note.backend, note.old, note.new,
                                    note.evidence, extra=journal.transition_fields(note))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not JOURNALD.exists() or not shutil.which("unshare")
                    or not shutil.which("systemd-cat"), reason="needs root, unshare and systemd-journald")
def test_a_real_journald_stores_the_fields_and_journalctl_finds_the_backend(tmp_path):
    env = {**os.environ, "JOURNALD": str(JOURNALD), "PYTHON": sys.executable, "PROGRAM": PROGRAM,
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", REAL_JOURNAL],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (entry,) = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert entry["MESSAGE"] == "api 10.0.1.11:8443: healthy -> quarantined: RST in SYN_SENT (refused)"
    assert {k: entry[k] for k in entry if k.startswith("IPVSLB_")} == {
        "IPVSLB_SERVICE": "api", "IPVSLB_BACKEND": "10.0.1.11:8443", "IPVSLB_STATE": "quarantined",
        "IPVSLB_EVIDENCE": "RST in SYN_SENT (refused)"}
    assert (entry["PRIORITY"], entry["SYSLOG_IDENTIFIER"], entry["_TRANSPORT"]) == ("4", "ipvslb", "journal")
    # The record's own attributes (msg, args, levelname...) are not valid field names: dropped.
    assert not [k for k in entry if k.islower()]
