"""Notify hooks with real subprocesses (small sh scripts): the note reaches the hook's
environment, the timeout kills the hook and its children, at most `limit` run at once, a
full backlog drops the oldest notes, failures are logged and counted, and the event loop
keeps its pace while hooks run."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from ipvslb.notify import Notifier, TransitionNote
from ipvslb.snapshot import NotifyCounts
from tests.unit import snapshots

SH = "/bin/sh"


def note(i: int = 1, old: str = "healthy", new: str = "quarantined") -> TransitionNote:
    return TransitionNote("api", f"10.0.1.{i}:8443", old, new, f"3 connects refused ({i})")


def script(tmp_path: Path, body: str) -> tuple[str, ...]:
    path = tmp_path / "hook.sh"
    path.write_text(body)
    return (SH, str(path), str(tmp_path))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its new parent) is dead too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def settle(notifier: Notifier, deadline: float = 10.0) -> None:
    """Until every note ran (close() would drop the waiting ones)."""
    end = time.monotonic() + deadline
    while notifier.running or notifier.waiting:
        assert time.monotonic() < end, "hooks did not finish"
        await asyncio.sleep(0.01)


def test_the_note_is_in_the_hooks_environment_with_the_inherited_path(tmp_path, monkeypatch):
    monkeypatch.setenv("IPVSLB_TEST_INHERITED", "kept")
    argv = script(tmp_path, 'env > "$1/env"\n')

    async def main():
        n = Notifier(argv, timeout=5, limit=1)
        n.transition(TransitionNote("api", "[fd00::1]:80", "probing", "healthy", "2 probes passed"))
        await settle(n)
        await n.close()
        return n

    n = asyncio.run(main())
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert {k: env[k] for k in env if k.startswith("IPVSLB_") and k != "IPVSLB_TEST_INHERITED"} == {
        "IPVSLB_SERVICE": "api", "IPVSLB_BACKEND": "[fd00::1]:80", "IPVSLB_OLD_STATE": "probing",
        "IPVSLB_NEW_STATE": "healthy", "IPVSLB_EVIDENCE": "2 probes passed"}
    assert env["PATH"] == os.environ["PATH"]
    assert env["IPVSLB_TEST_INHERITED"] == "kept"
    assert n.counters() == {"failures": 0, "dropped": 0}


def test_no_command_runs_nothing(tmp_path):
    async def main():
        n = Notifier(None, timeout=5, limit=1)
        n.transition(note())
        assert (n.running, n.waiting) == (0, 0)
        await n.close()

    asyncio.run(main())


def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path, caplog):
    # The hook starts a child of its own, then both outlive the timeout.
    argv = script(tmp_path, 'sleep 30 & echo $! > "$1/child"; echo $$ > "$1/hook"; wait\n')

    async def main():
        n = Notifier(argv, timeout=0.5, limit=1)
        start = time.monotonic()
        n.transition(note())
        await settle(n)
        return n, time.monotonic() - start

    with caplog.at_level(logging.ERROR, logger="ipvslb"):
        n, took = asyncio.run(main())
    assert 0.5 <= took < 2.0
    hook, child = (int((tmp_path / name).read_text()) for name in ("hook", "child"))
    deadline = time.monotonic() + 2
    while (alive(hook) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(hook) and not alive(child)
    assert n.failures == 1
    assert "still running after 0.5s, killed" in caplog.text
    assert "api 10.0.1.1:8443 (healthy -> quarantined)" in caplog.text


def test_a_child_left_holding_stderr_does_not_make_the_hook_slow(tmp_path):
    """The hook exits at once and leaves a child with its stderr: the hook is done (and
    passed), it is not held until the timeout."""
    argv = script(tmp_path, 'sleep 3 & echo $! > "$1/child"; exit 0\n')

    async def main():
        n = Notifier(argv, timeout=2, limit=1)
        start = time.monotonic()
        n.transition(note())
        await settle(n)
        return n, time.monotonic() - start

    n, took = asyncio.run(main())
    os.kill(int((tmp_path / "child").read_text()), 9)
    assert took < 1.0
    assert n.failures == 0


def test_a_failing_hook_is_logged_with_its_first_stderr_line(tmp_path, caplog):
    argv = script(tmp_path, 'echo "pager unreachable: $IPVSLB_BACKEND" >&2; echo "second line" >&2; exit 3\n')

    async def main():
        n = Notifier(argv, timeout=5, limit=1)
        n.transition(note(7))
        await settle(n)
        return n

    with caplog.at_level(logging.ERROR, logger="ipvslb"):
        n = asyncio.run(main())
    assert n.failures == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.endswith("(healthy -> quarantined): exit status 3: pager unreachable: 10.0.1.7:8443")


def test_a_missing_executable_is_logged_and_counted(tmp_path, caplog):
    async def main():
        n = Notifier((str(tmp_path / "absent"),), timeout=5, limit=1)
        n.transition(note())
        n.transition(note(2))
        await settle(n)
        return n

    with caplog.at_level(logging.ERROR, logger="ipvslb"):
        n = asyncio.run(main())
    assert n.failures == 2
    assert caplog.text.count("cannot run: No such file or directory") == 2


def intervals(tmp_path: Path) -> list[tuple[float, float]]:
    spans = []
    for path in tmp_path.glob("span.*"):
        start, end = map(float, path.read_text().split())
        spans.append((start, end))
    return spans


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    current = peak = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


SPAN = 'start=$(date +%s.%N); sleep 0.3; echo "$start $(date +%s.%N)" > "$1/span.$$"\n'


def test_at_most_limit_hooks_run_at_once_and_the_rest_wait(tmp_path):
    argv = script(tmp_path, SPAN)

    async def main():
        n = Notifier(argv, timeout=5, limit=2)
        for i in range(6):
            n.transition(note(i))
        assert (n.running, n.waiting) == (2, 4)
        await settle(n)
        return n

    n = asyncio.run(main())
    spans = intervals(tmp_path)
    assert len(spans) == 6 and n.counters() == {"failures": 0, "dropped": 0}
    assert most_at_once(spans) == 2


def test_a_full_backlog_drops_the_oldest_notes(tmp_path, caplog):
    argv = script(tmp_path, 'sleep 0.2; echo > "$1/ran.$IPVSLB_BACKEND"\n')

    async def main():
        n = Notifier(argv, timeout=5, limit=1, backlog=2)
        for i in range(1, 6):
            n.transition(note(i))
        await settle(n)
        return n

    with caplog.at_level(logging.WARNING, logger="ipvslb"):
        n = asyncio.run(main())
    ran = sorted(p.name.removeprefix("ran.") for p in tmp_path.glob("ran.*"))
    # 1 started at once; 2 and 3 were pushed out of the backlog by 4 and 5.
    assert ran == ["10.0.1.1:8443", "10.0.1.4:8443", "10.0.1.5:8443"]
    assert n.dropped == 2
    assert "dropping the oldest notes (first: api 10.0.1.2:8443" in caplog.text
    assert "caught up; 2 notes were dropped" in caplog.text


def test_the_loop_keeps_its_pace_while_hooks_run(tmp_path):
    """A ticker that should wake every 10 ms, while hooks that each sleep 1 s run: a hook run
    on the loop (or waited for) would make it a second late. The bounds leave room for a
    busy test machine (an idle one: transition() 30 us, the ticker at most a few ms late)."""
    argv = script(tmp_path, 'sleep 1\n')

    async def main():
        n = Notifier(argv, timeout=5, limit=4)
        late, calls = [], []

        async def ticker():
            end = time.monotonic() + 1.2
            while time.monotonic() < end:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                late.append(time.monotonic() - before - 0.01)

        tick = asyncio.get_running_loop().create_task(ticker())
        await asyncio.sleep(0.05)
        for i in range(8):
            before = time.monotonic()
            n.transition(note(i))
            calls.append(time.monotonic() - before)
            await asyncio.sleep(0.02)
        await tick
        await settle(n)
        return late, calls, n

    late, calls, n = asyncio.run(main())
    assert n.failures == 0
    assert max(calls) < 0.1, f"transition() took {max(calls) * 1e3:.1f} ms"
    assert max(late) < 0.25, f"the loop was late by {max(late) * 1e3:.1f} ms"


def test_close_waits_for_running_hooks_and_drops_the_waiting(tmp_path, caplog):
    argv = script(tmp_path, 'sleep 0.3; echo > "$1/ran.$IPVSLB_BACKEND"\n')

    async def main():
        n = Notifier(argv, timeout=5, limit=1)
        for i in range(1, 4):
            n.transition(note(i))
        start = time.monotonic()
        await n.close()
        took = time.monotonic() - start
        n.transition(note(9))  # after close: ignored
        return n, took

    with caplog.at_level(logging.WARNING, logger="ipvslb"):
        n, took = asyncio.run(main())
    assert [p.name for p in tmp_path.glob("ran.*")] == ["ran.10.0.1.1:8443"]
    assert 0.25 < took < 2.0
    assert (n.running, n.waiting, n.dropped) == (0, 0, 2)
    assert "shutting down, 2 waiting notes not run" in caplog.text


def test_close_ends_a_slow_hook_at_its_timeout(tmp_path):
    argv = script(tmp_path, 'sleep 30\n')

    async def main():
        n = Notifier(argv, timeout=0.3, limit=1)
        n.transition(note())
        start = time.monotonic()
        await n.close()
        return n, time.monotonic() - start

    n, took = asyncio.run(main())
    assert took < 1.5 and n.failures == 1


def test_transition_needs_the_running_loop():
    with pytest.raises(RuntimeError):
        Notifier(("/bin/true",), timeout=1, limit=1).transition(note())


def test_the_counters_are_exported_as_metrics(tmp_path):
    from prometheus_client import generate_latest

    from ipvslb import metrics

    async def main():
        n = Notifier((str(tmp_path / "absent"),), timeout=5, limit=1, backlog=0)
        n.transition(note(1))
        n.transition(note(2))  # no slot, no backlog: dropped
        await settle(n)
        return n

    n = asyncio.run(main())
    snap = snapshots.snapshot(notify=NotifyCounts(**n.counters()))
    text = generate_latest(metrics.registry_for(lambda: snap)).decode()
    assert "ipvslb_notify_failures_total 1.0" in text
    assert "ipvslb_notify_dropped_total 1.0" in text
