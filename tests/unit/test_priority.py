"""settings.nice: the daemon's own priority, set once the tracer is compiled."""
import errno
import logging
import os

from ipvslb import daemon


def test_the_configured_nice_value_is_set_on_the_calling_thread(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(os, "setpriority", lambda *args: calls.append(args))
    with caplog.at_level(logging.INFO, "ipvslb"):
        daemon.set_nice(-10)
    assert calls == [(os.PRIO_PROCESS, 0, -10)]
    assert "running at nice -10" in caplog.text


def test_null_keeps_the_priority_the_daemon_was_started_with(monkeypatch):
    monkeypatch.setattr(os, "setpriority", lambda *args: (_ for _ in ()).throw(AssertionError(args)))
    daemon.set_nice(None)


def test_without_cap_sys_nice_the_daemon_warns_and_runs_on(monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, "ipvslb"):
        daemon.set_nice(-5)
    assert "cannot set nice -5" in caplog.text
    assert "CAP_SYS_NICE" in caplog.text and "settings.nice" in caplog.text
