"""Background checks (`health.active_interval`): every backend of a service that sets it is
probed with the service's probe type every interval, so that a backend which accepts
connects but fails requests (an HTTP 503, a hang after accept) is found without a client
connect failing first. Services without `active_interval` get no probe traffic from here.

The checker only probes and reports each outcome (`report`); what an outcome means is the
health engine's decision. Checks are jittered (± `probe_jitter`, the first one spread over
a whole interval, so that a restart does not probe every backend at once) and at most
MAX_RUNNING run at once; a backend whose previous check is still running skips its turn.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable

from ipvslb import probes
from ipvslb.model import Endpoint, Service, ServiceKey
from ipvslb.probe import ProbeOutcome

log = logging.getLogger("ipvslb")

# Checks running at once, over all services (the probes module bounds all probes but
# `tcp` further: a check also waits there for a slot).
MAX_RUNNING = 32
# A check's timeout when the probe sets none: the engine's probe timeout before a
# backend's connect history is trusted (health.UNTRUSTED_PROBE_TIMEOUT), at most the interval.
DEFAULT_TIMEOUT = 1.0

Report = Callable[[Service, Endpoint, ProbeOutcome], None]
Run = Callable[[Service, Endpoint, float, int], Awaitable[ProbeOutcome]]


class ActiveChecks:
    """`update(services)` at start and on every reload; `run()` is the daemon's task.
    `wanted(service, backend)` says whether a backend is to be checked now (the daemon:
    in rotation); `report(service, backend, outcome)` gets every check's outcome."""

    def __init__(self, report: Report, *, wanted: Callable[[Service, Endpoint], bool] = lambda s, b: True,
                 run: Run = probes.run, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._report, self._wanted, self._run = report, wanted, run
        self._rng, self._clock = rng or random.Random(), clock
        self._services: dict[ServiceKey, Service] = {}
        self._due: dict[tuple[ServiceKey, Endpoint], float] = {}
        self._heap: list[tuple[float, ServiceKey, Endpoint]] = []
        self._running: dict[tuple[ServiceKey, Endpoint], asyncio.Task] = {}
        self._changed = asyncio.Event()
        self.checks = 0  # started, for status and tests

    def update(self, services: Iterable[Service]) -> None:
        """The services in force. A backend that stays keeps its next check's time; a new
        one is first checked at a random point of its first interval."""
        now = self._clock()
        self._services = {s.key: s for s in services
                          if s.health.enabled and s.health.active_interval is not None}
        due: dict[tuple[ServiceKey, Endpoint], float] = {}
        for key, service in self._services.items():
            interval = service.health.active_interval
            assert interval is not None
            for backend in service.backends:
                if backend.weight == 0:
                    continue  # disabled by configuration: the engine never touches it
                slot = (key, backend.key)
                due[slot] = self._due.get(slot, now + self._rng.uniform(0, interval))
        self._due = due
        self._heap = [(t, key, backend) for (key, backend), t in due.items()]
        heapq.heapify(self._heap)
        self._changed.set()

    async def run(self) -> None:
        try:
            while True:
                self._changed.clear()
                if not self._heap:
                    await self._changed.wait()
                    continue
                when = self._heap[0][0]
                delay = when - self._clock()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await self._changed.wait()
                        continue  # re-planned: look again
                    except TimeoutError:
                        pass
                when, key, backend = heapq.heappop(self._heap)
                if self._due.get((key, backend)) != when:
                    continue  # a stale entry of a re-planned backend
                service = self._services[key]
                assert service.health.active_interval is not None
                following = when + self._jittered(service)
                self._due[(key, backend)] = max(following, self._clock())
                heapq.heappush(self._heap, (self._due[(key, backend)], key, backend))
                self._start(service, backend)
        finally:
            for task in self._running.values():
                task.cancel()

    def _jittered(self, service: Service) -> float:
        interval = service.health.active_interval
        assert interval is not None
        jitter = service.health.probe_jitter
        return interval * (1 + self._rng.uniform(-jitter, jitter))

    def _start(self, service: Service, backend: Endpoint) -> None:
        slot = (service.key, backend)
        if slot in self._running or len(self._running) >= MAX_RUNNING:
            log.debug("%s %s: active check skipped (%s)", service.name, backend,
                      "the previous one still runs" if slot in self._running else f"{MAX_RUNNING} running")
            return
        if not self._wanted(service, backend):
            return
        self.checks += 1
        task = asyncio.get_running_loop().create_task(self._check(service, backend))
        self._running[slot] = task
        task.add_done_callback(lambda _: self._running.pop(slot, None))

    async def _check(self, service: Service, backend: Endpoint) -> None:
        assert service.health.active_interval is not None
        seconds = probes.timeout(service, min(DEFAULT_TIMEOUT, service.health.active_interval))
        try:
            outcome = await self._run(service, backend, seconds, self._rng.getrandbits(16))
        except Exception as err:  # a check that cannot be made says nothing about the backend
            log.error("%s %s: active check not made: %r", service.name, backend, err)
            return
        if self._services.get(service.key) is not service:
            return  # reloaded away meanwhile
        try:
            self._report(service, backend, outcome)
        except Exception as err:
            log.error("%s %s: active check outcome not taken: %r", service.name, backend, err, exc_info=err)
