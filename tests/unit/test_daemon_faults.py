"""The daemon without a kernel: the real IPVS manager over the fake kernel, a fake tracer
and prober. Faults in every long-lived task are caught, counted and carried past; a
reload is all or nothing; an early SIGHUP is a reload once ready; one daemon per state dir."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ipvslb import config, daemon, health, statedir, systemd
from ipvslb.ipvs import Manager, messages
from ipvslb.ipvs.client import IPVS
from ipvslb.snapshot import NotifyCounts
from ipvslb.tracer.records import ConnEvent, Kind
from tests.unit.fake_ipvs import FAMILY, FakeKernel
from tests.unit.test_ipvs_manager import FakeVips

WEB = "  - {name: web, vip: 10.90.0.1, port: 80, backends: [10.77.0.1, 10.77.0.2]}\n"
API = "  - {name: api, vip: 10.90.0.2, port: 80, backends: [10.77.0.3]}\n"
DNS = "  - {name: dns, protocol: udp, vip: 10.90.0.3, port: 53, backends: [10.77.0.4]}\n"


class FailingKernel(FakeKernel):
    """Refuses with `fail_errno` the commands in `fail` (netlink command numbers)."""

    def __init__(self):
        super().__init__()
        self.fail: set[int] = set()
        self.fail_errno = errno.ETIMEDOUT

    def _change(self, cmd, msg):
        if cmd in self.fail:
            return self.fail_errno
        return super()._change(cmd, msg)


class FakeTracer:
    def __init__(self, settings=None):
        self._r, self._w = os.pipe()
        self.batch: list = []
        self.vips: list = []
        self.read_error: Exception | None = None
        self.set_vips_error: Exception | None = None
        self.sample_interval = 0
        self.wakeup_interval = 0.01
        self.attribution = "fake"
        self.compile_seconds = 0.0
        self.udp_unreachables = False
        self.udp_counting = False
        self.on_create = None

    def fileno(self):
        return self._r

    def read(self, timeout_ms=0):
        if self.read_error is not None:
            err, self.read_error = self.read_error, None
            raise err
        batch, self.batch = self.batch, []
        return batch

    def counted(self):
        return []

    def set_vips(self, vips):
        if self.set_vips_error is not None:
            raise self.set_vips_error
        self.vips = sorted((s.protocol, str(s.vip), s.port) for s in vips)

    def lost_records(self):
        return 0

    def missed_runs(self):
        return 0

    def close(self):
        os.close(self._r)
        os.close(self._w)


class FakeRescuer:
    def prepare(self):
        pass

    def rescue(self, *args):
        return []

    def close(self):
        pass


@pytest.fixture
def place(monkeypatch):
    path = Path(tempfile.mkdtemp(prefix="ipvslb-d-"))   # short: sun_path
    (path / "vs").mkdir()
    for name in ("conntrack", "expire_nodest_conn", "expire_quiescent_template", "conn_reuse_mode"):
        (path / "vs" / name).write_text("0\n")
    monkeypatch.setattr(daemon, "conntrack", SimpleNamespace(Rescuer=FakeRescuer), raising=False)
    notes: list[str] = []
    monkeypatch.setattr(systemd, "notify", lambda *states: notes.extend(s.split("=")[0] for s in states) or True)
    monkeypatch.setattr(daemon, "ERROR_RESTART", 0.01)
    yield SimpleNamespace(path=path, notes=notes)
    shutil.rmtree(path)


def make(place, services: str, settings: str = "") -> tuple[daemon.Daemon, FailingKernel, FakeTracer]:
    path = place.path / "config.yaml"
    path.write_text(f"settings: {{state_dir: {place.path}/state, status_socket: {place.path}/s.sock, "
                    f"metrics_address: '', nice: null{settings}}}\nservices:\n" + services)
    kernel, tracer = FailingKernel(), FakeTracer()
    d = daemon.Daemon(str(path), config.load(path), random.Random(1),
                      manager_factory=lambda s: Manager(s, ipvs=IPVS(sock=kernel, family=FAMILY), vips=FakeVips(),
                                                        sysctl_root=place.path / "vs"),
                      tracer_factory=lambda s: tracer)
    return d, kernel, tracer


def started(d: daemon.Daemon) -> daemon.Daemon:
    """The start-up steps of run() without its loop."""
    d._open_kernel()
    d._start_health(time.monotonic())
    d._apply()
    d.tracer.set_vips(d.cfg.services)
    return d


# -- reload: all or nothing ----------------------------------------------------------------

def test_a_reload_whose_apply_fails_keeps_everything_in_force(place, caplog):
    d, kernel, tracer = make(place, WEB)
    started(d)
    before = (d.cfg, dict(d.health), list(tracer.vips), set(kernel.services))
    Path(d.config_path).write_text(Path(d.config_path).read_text() + API)
    kernel.fail = {messages.CMD_NEW_DEST}   # the new service is made, its destination times out
    with caplog.at_level(logging.ERROR, logger="ipvslb"):
        d.reload()
    assert (d.cfg, d.health, tracer.vips) == before[:3]
    assert set(kernel.services) == before[3]   # the half-made service is taken back
    assert d.reloads == {"failed": 1}
    assert place.notes == ["RELOADING", "MONOTONIC_USEC", "READY", "STATUS"]
    assert any("reload failed, the previous configuration stays in force" in r.getMessage() for r in caplog.records)
    # Once the kernel takes it, the same file goes through.
    kernel.fail = set()
    d.reload()
    assert d.reloads == {"failed": 1, "ok": 1}
    assert len(d.health) == 2 and len(kernel.services) == 2 and len(tracer.vips) == 2


def test_a_reload_the_tracer_refuses_keeps_everything_in_force(place):
    d, kernel, tracer = make(place, WEB)
    started(d)
    Path(d.config_path).write_text(Path(d.config_path).read_text() + API)
    tracer.set_vips_error = OSError(errno.E2BIG, "map full")
    d.reload()
    assert len(d.health) == 1 and len(d.cfg.services) == 1 and len(kernel.services) == 1
    assert d.reloads == {"failed": 1}


def test_a_kept_service_changes_only_when_the_reload_succeeds(place):
    d, kernel, tracer = make(place, WEB)
    started(d)
    web = next(iter(d.health.values()))
    Path(d.config_path).write_text(Path(d.config_path).read_text().replace("10.77.0.2]", "10.77.0.2, 10.77.0.9]"))
    kernel.fail = {messages.CMD_NEW_DEST}
    d.reload()
    assert next(iter(d.health.values())) is web and len(web.weights()) == 2
    kernel.fail = set()
    d.reload()
    assert next(iter(d.health.values())) is web and len(web.weights()) == 3   # the same object: probes in flight land


@pytest.mark.parametrize("error", [ValueError("Exceeds the limit (4300 digits)"), MemoryError(), RuntimeError("x")])
def test_any_error_from_the_file_is_a_refused_reload_with_ready(place, monkeypatch, error):
    d, kernel, tracer = make(place, WEB)
    started(d)

    def load(path):
        raise error
    monkeypatch.setattr(config, "load", load)
    d.reload()
    assert d.reloads == {"failed": 1} and len(d.health) == 1
    assert place.notes[-2:] == ["READY", "STATUS"]


def test_sighup_reloads_parse_off_the_loop_and_one_at_a_time(place, monkeypatch):
    d, kernel, tracer = make(place, WEB)
    started(d)
    threads = []
    load, parsing = config.load, threading.Event()

    def slow_load(path):
        threads.append(threading.current_thread().name)
        parsing.wait(5)
        return load(path)
    monkeypatch.setattr(config, "load", slow_load)

    async def main():
        d._on_sighup()
        for _ in range(500):
            await asyncio.sleep(0.01)   # the loop runs while the file is parsed
            if threads:
                break
        assert d.reloads == {} and threads
        d._on_sighup()   # during the first: one more after it, for both
        d._on_sighup()
        parsing.set()
        await d._reload_task
    asyncio.run(main())
    assert d.reloads == {"ok": 2}
    assert len(threads) == 2 and all(name != "MainThread" for name in threads)
    assert place.notes.count("RELOADING") == place.notes.count("READY") == 2


# -- nothing dies silently -------------------------------------------------------------------

def test_a_probe_that_cannot_start_is_one_local_failure(place, monkeypatch):
    d, kernel, tracer = make(place, WEB)
    started(d)
    svc = next(iter(d.health.values()))
    fed = []
    monkeypatch.setattr(svc, "feed", lambda evidence, now: fed.append(evidence) or [])

    class NoSockets:
        def TcpProbe(self, *args):
            raise OSError(errno.EMFILE, "Too many open files")
    d.executor.prober = NoSockets()
    backend = svc.service.backends[0].key
    d.executor.act(svc, [health.StartProbe(backend, 1.0)])
    assert len(fed) == 1
    assert isinstance(fed[0], health.ProbeResult) and fed[0].backend == backend
    assert not fed[0].ok and fed[0].local


def test_a_probe_task_that_raises_still_gives_its_result(place, monkeypatch):
    d, kernel, tracer = make(place, DNS)
    started(d)
    svc = next(iter(d.health.values()))
    fed = []
    monkeypatch.setattr(svc, "feed", lambda evidence, now: fed.append(evidence) or [])

    async def broken(*args):
        raise OSError(errno.EMFILE, "Too many open files")

    async def main():
        d.executor.prober = SimpleNamespace(probe=broken)
        d.executor.act(svc, [health.StartProbe(svc.service.backends[0].key, 1.0)])
        await asyncio.gather(*d.executor.probes)
    asyncio.run(main())
    assert len(fed) == 1 and not fed[0].ok and fed[0].local
    assert d.internal_errors == {"probe": 1}


def test_a_tick_that_raises_is_counted_logged_once_and_the_other_services_still_tick(place, monkeypatch, caplog):
    d, kernel, tracer = make(place, WEB + API)
    started(d)
    web, api = d.health.values()
    ticked = []
    monkeypatch.setattr(web, "tick", lambda now: (_ for _ in ()).throw(KeyError("bug")))
    monkeypatch.setattr(api, "tick", lambda now: ticked.append(now) or [])

    async def main():
        with caplog.at_level(logging.DEBUG, logger="ipvslb"):
            d._tick()
            d._tick()
    asyncio.run(main())
    assert len(ticked) == 2
    assert d.internal_errors == {"tick": 2}
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "internal error in tick" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "tick" not in d.heartbeats   # the watchdog would not be fed


def test_an_evidence_read_that_raises_is_carried_past(place):
    d, kernel, tracer = make(place, WEB)
    started(d)

    async def main():
        tracer.read_error = RuntimeError("ring buffer bug")
        d._on_records()
        assert "evidence" not in d.heartbeats
        d._on_records()
    asyncio.run(main())
    assert d.internal_errors == {"evidence": 1}
    assert "evidence" in d.heartbeats


def test_a_record_that_raises_costs_only_itself_not_the_rest_of_its_batch(place, monkeypatch, caplog):
    d, kernel, tracer = make(place, WEB)
    started(d)
    svc = next(iter(d.health.values()))
    good, bad = (b.key for b in svc.service.backends)
    fed = []

    def feed(evidence, now):
        if evidence.backend == bad:
            raise KeyError("bug")
        fed.append(evidence)
        return []
    monkeypatch.setattr(svc, "feed", feed)
    now = time.monotonic()

    def connect(i, backend):
        return ConnEvent(Kind.CONNECT, now + i, 1000 + i, "tcp", (ipaddress.ip_address("10.90.0.9"), 40000 + i),
                         (svc.service.vip, 80), backend)
    tracer.batch = [connect(0, good), connect(1, bad), connect(2, good), connect(3, bad), connect(4, good)]

    async def main():
        with caplog.at_level(logging.DEBUG, logger="ipvslb"):
            d._on_records()
    asyncio.run(main())
    assert [e.t for e in fed] == [now, now + 2, now + 4]
    assert d.records["connect"] == 5
    assert d.internal_errors == {"evidence": 2}
    logged = [r for r in caplog.records
              if r.levelno == logging.ERROR and "internal error in evidence" in r.getMessage()]
    assert len(logged) == 1
    assert "evidence" in d.heartbeats   # the reader works: the watchdog is fed


def test_a_batch_whose_every_record_raises_does_not_feed_the_watchdog(place, monkeypatch):
    d, kernel, tracer = make(place, WEB)
    started(d)
    svc = next(iter(d.health.values()))
    monkeypatch.setattr(svc, "feed", lambda evidence, now: (_ for _ in ()).throw(KeyError("bug")))
    tracer.batch = [ConnEvent(Kind.CONNECT, time.monotonic(), 1000, "tcp", (ipaddress.ip_address("10.90.0.9"), 40000),
                              (svc.service.vip, 80), svc.service.backends[0].key)]

    async def main():
        d._on_records()
        assert "evidence" not in d.heartbeats
        d._on_records()   # an empty read: the reader runs through again
    asyncio.run(main())
    assert d.internal_errors == {"evidence": 1}
    assert "evidence" in d.heartbeats


def test_the_watchdog_is_fed_only_while_tick_and_evidence_run_through(place):
    d, kernel, tracer = make(place, WEB)
    started(d)

    async def main():
        assert d._alive()
        tracer.read_error = RuntimeError("ring buffer bug")
        assert not d._alive()
        assert d._alive()
    asyncio.run(main())


def test_verify_and_udp_watch_are_restarted_after_an_exception(place, monkeypatch):
    d, kernel, tracer = make(place, DNS)
    started(d)
    d.cfg = dataclasses.replace(d.cfg, settings=dataclasses.replace(d.cfg.settings, ipvs_verify_interval=0.01))
    calls = {"verify": 0, "dests": 0}
    apply = d._apply

    def flaky_apply(routine=False):
        calls["verify"] += 1
        if calls["verify"] == 1:
            raise RuntimeError("verify bug")
        apply(routine)
    monkeypatch.setattr(d, "_apply", flaky_apply)
    dests = d.manager.ipvs.dests

    def flaky_dests(*args, stats=False):
        if not stats:   # the verify's read
            return dests(*args)
        calls["dests"] += 1
        if calls["dests"] == 1:
            raise RuntimeError("counter bug")
        return dests(*args, stats=stats)
    monkeypatch.setattr(d.manager.ipvs, "dests", flaky_dests)

    async def main():
        tasks = [asyncio.create_task(d._supervised("verify", d._verify_ipvs)),
                 asyncio.create_task(d._supervised("udp_watch", d._watch_udp))]
        deadline = time.monotonic() + 5
        while not (calls["verify"] > 3 and calls["dests"] >= 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
    asyncio.run(main())
    assert d.internal_errors == {"verify": 1, "udp_watch": 1}
    assert calls["verify"] > 3 and calls["dests"] >= 2   # both ran again after their exception


def test_status_and_metrics_snapshots_that_raise_are_counted(place, monkeypatch):
    d, kernel, tracer = make(place, WEB)
    started(d)
    monkeypatch.setattr(d, "snapshot", lambda: 1 / 0)
    assert d._status_snapshot() == {"error": "internal error: ZeroDivisionError('division by zero')"}
    with pytest.raises(ZeroDivisionError):
        d._metrics_snapshot()
    assert d.internal_errors == {"status": 1, "metrics": 1}


# -- lifecycle ---------------------------------------------------------------------------------

def test_a_sighup_during_the_tracer_compile_is_a_reload_once_ready(place):
    d, kernel, tracer = make(place, WEB)

    def compile_with_sighup(settings):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)   # the handler runs at the next bytecode
        return tracer
    d._tracer_factory = compile_with_sighup

    async def main():
        run = asyncio.create_task(d.run())
        for _ in range(500):
            await asyncio.sleep(0.01)
            if d.reloads:
                break
        d._stop.set()
        await run
    asyncio.run(main())
    assert d.reloads == {"ok": 1}
    assert place.notes.index("READY") < place.notes.index("RELOADING")


def test_a_second_daemon_on_the_same_state_dir_names_the_first_one(place, capsys):
    d, kernel, tracer = make(place, WEB)
    held = statedir.lock(place.path / "state")
    try:
        def not_reached(self):
            pytest.fail("compiled the tracer")
        original = daemon.Daemon._open_kernel
        daemon.Daemon._open_kernel = not_reached
        try:
            root = logging.getLogger()
            handlers, level = root.handlers[:], root.level
            code = daemon.main(d.config_path)
            root.handlers[:], root.level = handlers, level
        finally:
            daemon.Daemon._open_kernel = original
    finally:
        held.close()
    assert code == 1
    captured = capsys.readouterr()
    lines = (captured.err + captured.out).splitlines()
    assert len(lines) == 1
    assert f"cannot start: another ipvslb (PID {os.getpid()}) runs with state directory {place.path}/state" in lines[0]
    # Released with its holder: the next one starts.
    statedir.lock(place.path / "state").close()


def test_the_notify_hook_comes_from_the_settings_and_its_counters_reach_the_snapshot(place):
    d, kernel, tracer = make(place, WEB, ", notify_command: [/bin/true, x], notify_timeout: 2, notify_concurrency: 3")
    started(d)
    assert d.executor.notifier is d.notifier
    assert (d.notifier.argv, d.notifier.timeout, d.notifier.limit) == (("/bin/true", "x"), 2, 3)
    d.notifier.dropped = 5
    assert d.snapshot().notify == NotifyCounts(failures=0, dropped=5)


def test_internal_errors_are_exported_per_task(place):
    from prometheus_client import generate_latest

    from ipvslb import metrics
    d, kernel, tracer = make(place, WEB)
    started(d)

    async def main():
        tracer.read_error = RuntimeError("ring buffer bug")
        d._on_records()
    asyncio.run(main())
    text = generate_latest(metrics.registry_for(d.snapshot)).decode()
    assert 'ipvslb_internal_errors_total{task="evidence"} 1.0' in text
    assert 'ipvslb_internal_errors_total{task="tick"} 0.0' in text
    assert set(metrics.INTERNAL_TASKS) >= {"tick", "evidence", "probe", "verify", "udp_watch", "reload", "status",
                                           "metrics"}


def test_systemd_is_told_alive_only_while_the_tracer_reads(place, monkeypatch):
    d, kernel, tracer = make(place, WEB)
    started(d)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")   # fed every 10 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    class Broken(RuntimeError):
        pass

    async def watch(done) -> int:
        """WATCHDOG=1 sent until `done()` (at most 5 s)."""
        before = place.notes.count("WATCHDOG")
        task = asyncio.create_task(d._watchdog())
        deadline = time.monotonic() + 5
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        return place.notes.count("WATCHDOG") - before

    async def main():
        assert await watch(lambda: place.notes.count("WATCHDOG") >= 3) >= 3
        monkeypatch.setattr(tracer, "read", lambda timeout_ms=0: (_ for _ in ()).throw(Broken("wedged ring")))
        assert await watch(lambda: d.internal_errors["evidence"] >= 3) == 0
    asyncio.run(main())
    assert d.internal_errors["evidence"] >= 3


def test_a_tick_due_while_the_daemon_stops_never_runs_on_the_closed_tracer(place):
    d, kernel, tracer = make(place, WEB)
    closed = []
    original_close = tracer.close

    def close():
        closed.append(True)
        original_close()

    def read(timeout_ms=0):
        if closed:
            raise ValueError("I/O operation on closed epoll object")   # as the real tracer's
        return []
    tracer.close, tracer.read = close, read

    async def main():
        run = asyncio.create_task(d.run())
        for _ in range(500):
            await asyncio.sleep(0.01)
            if "READY" in place.notes:
                break
        loop = asyncio.get_running_loop()
        # A timer due during the shutdown, as a slow-start step or a connect deadline is.
        d._tick_handle = loop.call_later(0.05, d._tick)
        d._stop.set()
        await run
        await asyncio.sleep(0.2)
    asyncio.run(main())
    assert closed and d.internal_errors == {}


def test_a_reload_drops_the_connect_times_of_backends_that_left_and_keeps_the_others(place):
    d, kernel, tracer = make(place, WEB + API)
    started(d)
    web, api = (s.key for s in d.cfg.services)
    for key, backend in ((web, "10.77.0.1"), (web, "10.77.0.2"), (api, "10.77.0.3")):
        d.connect_times[(key, (ipaddress.ip_address(backend), 80))].observe(0.01)
    kept = d.connect_times[(web, (ipaddress.ip_address("10.77.0.1"), 80))]
    Path(d.config_path).write_text(Path(d.config_path).read_text().replace(", 10.77.0.2]", "]").replace(API, ""))
    d.reload()
    assert d.reloads == {"ok": 1}
    assert list(d.connect_times) == [(web, (ipaddress.ip_address("10.77.0.1"), 80))]
    assert d.connect_times[(web, (ipaddress.ip_address("10.77.0.1"), 80))] is kept


def test_a_reload_moves_the_tick_from_the_deadlines_of_the_services_it_changed_alone(place, monkeypatch):
    d, kernel, tracer = make(place, WEB + API)
    started(d)
    read = []

    def next_deadline(svc):
        read.append(svc.service.name)
        return time.monotonic() + 5 if svc.service.name == "dns" else None
    monkeypatch.setattr(health.ServiceHealth, "next_deadline", next_deadline)

    async def main():
        loop = asyncio.get_running_loop()
        d._tick_handle = loop.call_at(loop.time() + 1000, d._tick)
        Path(d.config_path).write_text(Path(d.config_path).read_text() + DNS)
        d.reload()
        when = d._tick_handle.when() - loop.time()
        d._tick_handle.cancel()
        return when
    assert 4 < asyncio.run(main()) <= 5   # the new service's deadline, not the old tick's
    assert d.reloads == {"ok": 1} and read == ["dns"]   # web and api are not read again
