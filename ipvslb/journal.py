"""Where the daemon's log lines go. Under systemd, when stderr is the journal, each record is
sent to journald natively (python3-systemd's JournalHandler) so that the fields a line
carries are searchable: a health transition logged with `extra=transition_fields(note)`
is found with `journalctl IPVSLB_BACKEND=10.0.1.11:8443`. Elsewhere: plain timestamped lines.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from ipvslb.notify import TransitionNote

# journald's priorities (syslog's) by logging level, for the stream fallback.
PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
IDENTIFIER = "ipvslb"


def transition_fields(note: TransitionNote) -> dict[str, str]:
    """journald fields for a health transition, passed as a log call's `extra`. JournalHandler
    sends every attribute of the record, and journald keeps those whose names are valid
    field names (upper case): these, not the record's own lower-case ones."""
    return {"IPVSLB_SERVICE": note.service, "IPVSLB_BACKEND": note.backend,
            "IPVSLB_STATE": note.new, "IPVSLB_EVIDENCE": note.evidence}


def stderr_is_journal(environ: dict[str, str] | None = None, fd: int = 2) -> bool:
    """systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected; it only counts
    when stderr is still that stream (not redirected by a wrapper, not inherited by a child
    that writes elsewhere)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        dev, inode = (int(part) for part in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


class StreamPriorityFormatter(logging.Formatter):
    """`<priority>message`: journald reads the prefix and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{PRIORITIES.get(record.levelname, 6)}>{super().format(record)}"


def journal_handler(sender: Callable | None = None) -> logging.Handler | None:
    """A JournalHandler (None when python3-systemd is missing); `sender` replaces
    systemd.journal.send, for tests."""
    try:
        from systemd.journal import JournalHandler, send
    except ImportError:
        return None
    handler = JournalHandler(sender_function=sender or send, SYSLOG_IDENTIFIER=IDENTIFIER)
    # The message alone (journald has the priority and the time); without a formatter of its
    # own, logging.basicConfig would give it "LEVEL:logger:" in front.
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def make_handler(journal: bool, sender: Callable | None = None) -> logging.Handler:
    if journal:
        handler = journal_handler(sender)
        if handler is not None:
            return handler
        # Without python3-systemd: priorities still, fields lost.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StreamPriorityFormatter())
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%H:%M:%S"))
    return handler


def setup_logging(level: str) -> None:
    handler = make_handler(stderr_is_journal())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
