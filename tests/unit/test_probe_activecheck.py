"""The background checks' scheduler (ipvslb.activecheck) with a fake probe: who is checked,
how often, how many at once, and nothing at all without active_interval."""
from __future__ import annotations

import asyncio
import ipaddress
import random

import pytest

from ipvslb import activecheck
from ipvslb.model import Backend, HealthSettings, ProbeSettings, Service
from ipvslb.probe import ProbeOutcome

A, B, C = (ipaddress.ip_address(f"10.0.1.{i}") for i in (1, 2, 3))


def service(name="web", port=80, interval: float | None = 0.1, jitter=0.0, weights=(1, 1), **health) -> Service:
    backends = tuple(Backend(addr, 8080, w) for addr, w in zip((A, B, C)[:len(weights)], weights, strict=True))
    return Service(name, "tcp", ipaddress.ip_address("10.0.0.1"), port, backends,
                   health=HealthSettings(active_interval=interval, probe_jitter=jitter, **health))


class FakeProbe:
    def __init__(self, delay=0.0, ok=True):
        self.delay, self.ok, self.calls, self.running, self.most = delay, ok, [], 0, 0

    async def __call__(self, svc, backend, seconds, ident):
        self.calls.append((svc.name, backend, seconds))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        return ProbeOutcome(self.ok, "fake", self.delay)


def checking(services, seconds, fake, reports=None, **kw) -> activecheck.ActiveChecks:
    reports = [] if reports is None else reports

    async def main():
        checks = activecheck.ActiveChecks(lambda s, b, o: reports.append((s.name, b, o.ok)), run=fake,
                                          rng=random.Random(1), **kw)
        checks.update(services)
        task = asyncio.create_task(checks.run())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return checks
    return asyncio.run(main())


def test_every_backend_is_checked_every_interval_and_reported():
    fake, reports = FakeProbe(ok=False), []
    checking([service(interval=0.1)], 0.55, fake, reports)
    per_backend = {b: sum(1 for _, got, _ in fake.calls if got == b) for b in ((A, 8080), (B, 8080))}
    # The first check at a random point of the first interval, then one per interval.
    assert all(5 <= n <= 6 for n in per_backend.values()), per_backend
    assert len(reports) == len(fake.calls) and all(not ok for *_, ok in reports)


def test_no_active_interval_means_no_checks_at_all():
    fake = FakeProbe()
    checks = checking([service(interval=None)], 0.3, fake)
    assert fake.calls == [] and checks.checks == 0


def test_disabled_health_and_weight_0_backends_are_not_checked():
    fake = FakeProbe()
    checking([service(name="off", enabled=False), service(name="w0", port=81, weights=(1, 0))], 0.35, fake)
    assert {(name, b) for name, b, _ in fake.calls} == {("w0", (A, 8080))}


def test_wanted_decides_who_is_checked():
    fake = FakeProbe()
    checking([service()], 0.35, fake, wanted=lambda svc, backend: backend == (B, 8080))
    assert fake.calls and {b for _, b, _ in fake.calls} == {(B, 8080)}


def test_timeout_is_the_probes_else_at_most_the_interval():
    fake = FakeProbe()
    checking([service(interval=0.1, weights=(1,)), service(name="t", port=81, interval=0.1, weights=(1,),
                                                           probe=ProbeSettings(type="http", timeout=0.05))],
             0.25, fake)
    assert {(name, s) for name, _, s in fake.calls} == {("web", 0.1), ("t", 0.05)}


def test_a_slow_check_is_not_started_again_while_it_runs():
    fake = FakeProbe(delay=0.35)
    checking([service(interval=0.1, weights=(1,))], 0.5, fake)
    assert fake.most == 1 and len(fake.calls) <= 2


def test_at_most_max_running_at_once(monkeypatch):
    monkeypatch.setattr(activecheck, "MAX_RUNNING", 4)
    fake = FakeProbe(delay=0.3)
    services = [service(name=f"s{i}", port=80 + i, interval=0.05) for i in range(6)]  # 12 backends
    checking(services, 0.4, fake)
    assert fake.most == 4


def test_jitter_spreads_the_checks():
    fake = FakeProbe()
    checking([service(interval=0.1, jitter=0.5, weights=(1,))], 1.0, fake)
    # +-50% around 0.1 s: between 7 and 20 checks in a second, and not exactly 10 every run.
    assert 7 <= len(fake.calls) <= 20


def test_reload_keeps_the_schedule_of_staying_backends_and_drops_removed_ones():
    async def main():
        fake, reports = FakeProbe(), []
        checks = activecheck.ActiveChecks(lambda s, b, o: reports.append((s.name, b)), run=fake,
                                          rng=random.Random(2))
        checks.update([service(interval=0.1)])
        task = asyncio.create_task(checks.run())
        await asyncio.sleep(0.25)
        checks.update([service(interval=0.1, weights=(1,))])  # B removed
        before = len(fake.calls)
        await asyncio.sleep(0.3)
        checks.update([])
        after = len(fake.calls)
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return fake.calls[before:after], len(fake.calls) - after
    between, after_all_gone = asyncio.run(main())
    assert between and {b for _, b, _ in between} == {(A, 8080)}
    assert after_all_gone == 0


def test_a_failing_probe_or_report_does_not_stop_the_checks():
    async def broken(svc, backend, seconds, ident):
        raise RuntimeError("bug")

    calls = []

    async def main():
        def report(s, b, o):
            calls.append(b)
            raise KeyError("bug")
        checks = activecheck.ActiveChecks(report, run=FakeProbe(), rng=random.Random(3))
        checks.update([service(interval=0.05, weights=(1,))])
        task = asyncio.create_task(checks.run())
        await asyncio.sleep(0.3)
        checks._run = broken
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    asyncio.run(main())
    assert len(calls) >= 3


@pytest.mark.parametrize("interval", [0.1])
def test_first_checks_are_spread_over_the_first_interval(interval):
    async def main():
        loop = asyncio.get_running_loop()
        times = []

        async def probe(svc, backend, seconds, ident):
            times.append(loop.time())
            return ProbeOutcome(True, "", 0.0)
        checks = activecheck.ActiveChecks(lambda *a: None, run=probe, rng=random.Random(4))
        start = loop.time()
        checks.update([service(name=f"s{i}", port=80 + i, interval=interval) for i in range(10)])
        task = asyncio.create_task(checks.run())
        await asyncio.sleep(interval)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return [t - start for t in times]
    offsets = asyncio.run(main())
    assert len(offsets) >= 15  # 20 backends, nearly all due within the first interval
    assert max(offsets) - min(offsets) > 0.05  # not all at once
