"""Carrying out the health engine's actions: weights written to IPVS, conntrack rescues
after a weight 0, probes started and their answers fed back, log lines, and notify hooks
and journald fields for each transition.

The kernel's ends (IPVS manager, conntrack rescuer, prober) are injected, so that the
executor runs in tests with fakes.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable

from ipvslb import health, journal, notify, probe, probes, udprequest
from ipvslb.model import format_endpoint

log = logging.getLogger("ipvslb")

# Probe answers one call may feed back before it gives up: an engine that keeps asking
# for probes answered at once would otherwise hold the loop forever.
MAX_ANSWERS = 1000


def probe_result(backend: tuple, outcome: probe.ProbeOutcome, now: float) -> health.ProbeResult:
    return health.ProbeResult(backend, outcome.ok, now, outcome.detail, local=outcome.local, refused=outcome.refused)


def cannot_probe(err: BaseException) -> probe.ProbeOutcome:
    """A probe that could not be made: a failure on this host, no evidence against the backend."""
    return probe.ProbeOutcome(False, f"probe not made: {err}", 0.0, local=True)


class Executor:
    """Carries out one service's actions at a time (`act`). `internal_error(task, err)`
    counts an exception a probe task did not expect; `current(svc)` says whether a
    service is still the one in force when its probe answers (a reload may replace it);
    `after_probe()` runs after a probe's answer was acted on (the daemon reschedules its
    tick). `notifier` (notify.Notifier) is told of each transition, after its log line."""

    def __init__(self, manager, rescuer, prober=probe, *, notifier: notify.Notifier | None = None,
                 rng: random.Random | None = None,
                 internal_error: Callable[[str, BaseException], None] | None = None,
                 current: Callable[[health.ServiceHealth], bool] = lambda svc: True,
                 after_probe: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic):
        self.manager, self.rescuer, self.prober, self.notifier = manager, rescuer, prober, notifier
        self.rng = rng or random.Random()
        self._internal_error = internal_error or (lambda task, err: log.error("%s: %r", task, err, exc_info=err))
        self._current, self._after_probe, self._clock = current, after_probe, clock
        self.probes: set[asyncio.Task] = set()
        # (service key, backend) -> recent (monotonic time, weight) written to IPVS, so that
        # status and tests can measure evidence-to-weight latency.
        self.weight_history: dict[tuple, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=32))

    def act(self, svc: health.ServiceHealth, actions: list) -> None:
        """Weights and probes first, log lines afterwards: under load a log write costs
        milliseconds, and the weight change is what the clients are waiting for. A probe
        answered before connect() returned is fed to health here, and what health decides
        then is carried out in the same call, in the order the engine decided it."""
        lines: list[Line] = []
        notes: list[notify.TransitionNote] = []
        pending: collections.deque[tuple[tuple, probe.ProbeOutcome]] = collections.deque()
        fed = 0
        while True:
            answered = self._run(svc, actions, lines, notes)
            # Depth first, as the engine's decisions came: an answer's own consequences
            # before the next answer of the batch before it.
            pending.extendleft(reversed(answered))
            if not pending:
                break
            fed += 1
            if fed > MAX_ANSWERS:
                self._emit(lines, notes)
                raise RuntimeError(f"{svc.service.name}: more than {MAX_ANSWERS} probes answered at once")
            backend, outcome = pending.popleft()
            now = self._clock()
            actions = svc.feed(probe_result(backend, outcome, now), now)
        if lines:
            try:
                # After the probes just created have sent their SYN (call_soon runs in order).
                asyncio.get_running_loop().call_soon(self._emit, lines, notes)
            except RuntimeError:  # no loop yet (start-up): nothing to wait for, no hooks to run
                self._emit(lines, [])

    def _emit(self, lines: list[Line], notes: list[notify.TransitionNote]) -> None:
        for level, message, args, extra in lines:
            log.log(level, message, *args, extra=extra)
        if self.notifier is not None:
            for note in notes:
                self.notifier.transition(note)

    def _run(self, svc: health.ServiceHealth, actions: list, lines: list[Line],
             notes: list[notify.TransitionNote]) -> list[tuple[tuple, probe.ProbeOutcome]]:
        """One batch of actions; returns the probes answered at once."""
        name = svc.service.name
        answered: list[tuple[tuple, probe.ProbeOutcome]] = []
        for action in actions:
            match action:
                case health.SetWeight(backend, weight, reason):
                    try:
                        self.manager.set_weight(svc.service.key, backend, weight)
                    except (OSError, KeyError) as err:
                        lines.append(_line(logging.ERROR, "%s %s: cannot set weight %d: %s",
                                           name, format_endpoint(backend), weight, err))
                    else:
                        self.weight_history[(svc.service.key, backend)].append((self._clock(), weight))
                        lines.append(_line(logging.INFO, "%s %s: weight %d (%s)", name, format_endpoint(backend),
                                           weight, reason))
                        if weight == 0:
                            self._rescue(svc, backend, lines)
                case health.StartProbe(backend, timeout):
                    # A TCP probe's SYN leaves now; the task only collects the answer.
                    try:
                        started = self.prober.TcpProbe(*backend) if probes.kind(svc.service) == "tcp" else None
                    except OSError as err:
                        # No socket (EMFILE, ENOBUFS): a failed probe, this host's fault, so
                        # that health gets its one result and the backend does not wait forever.
                        answered.append((backend, cannot_probe(err)))
                        continue
                    if started is not None and started.outcome is not None:
                        # Refused (or accepted) before connect() returned, as a backend on a
                        # local link often is: judged now, not a loop turn later in a task
                        # (10-20 ms measured in the test VM, most of a refusal's budget).
                        started.close()
                        answered.append((backend, started.outcome))
                        continue
                    task = asyncio.get_running_loop().create_task(self._probe(svc, backend, timeout, started))
                    self.probes.add(task)
                    task.add_done_callback(self.probes.discard)
                case health.Transition(backend, old, new, evidence):
                    note = notify.TransitionNote(name, format_endpoint(backend), str(old), str(new), evidence)
                    # The fields make the line searchable in the journal (journalctl IPVSLB_BACKEND=...).
                    lines.append((logging.WARNING, "%s %s: %s -> %s: %s",
                                  (name, note.backend, note.old, note.new, evidence), journal.transition_fields(note)))
                    notes.append(note)
                case health.QuarantineWithheld(backend, guard, evidence):
                    lines.append(_line(logging.WARNING, "%s %s: quarantine withheld by guard (%s): %s", name,
                                       format_endpoint(backend), guard, evidence))
                case health.FreezeReported(_, reason):
                    lines.append(_line(logging.ERROR, "%s: quarantines frozen, suspecting this host's own path: %s",
                                       name, reason))
                case health.FreezeLifted(_, reason):
                    lines.append(_line(logging.WARNING, "%s: quarantine freeze lifted: %s", name, reason))
        return answered

    def _rescue(self, svc: health.ServiceHealth, backend: tuple, lines: list[Line]) -> None:
        """Free the connects stuck on a backend just set to weight 0 from their conntrack
        entries, so that IPVS moves them at their next SYN retransmit (ipvslb.conntrack)."""
        started = time.monotonic()
        freed = self.rescuer.rescue(svc.service.protocol, svc.service.key[1:], backend)
        if freed:
            lines.append(_line(logging.INFO, "%s %s: %d stuck connects freed from conntrack in %.1f ms "
                               "(client ports %s), moved at their next SYN retransmit", svc.service.name,
                               format_endpoint(backend), len(freed), (time.monotonic() - started) * 1000,
                               " ".join(str(f.client[1]) for f in freed)))

    async def _probe(self, svc: health.ServiceHealth, backend: tuple, timeout: float,
                     started: probe.TcpProbe | None) -> None:
        try:
            if started is not None:
                outcome = await started.result(probes.timeout(svc.service, timeout))
            elif probes.kind(svc.service) == "udp":
                request = udprequest.for_service(svc.service, self.rng.getrandbits(16))
                outcome = await self.prober.probe(svc.service.protocol, backend[0], backend[1],
                                                  probes.timeout(svc.service, timeout), request)
            else:  # the service's probe type (health.probe)
                outcome = await probes.run(svc.service, backend, probes.timeout(svc.service, timeout),
                                           self.rng.getrandbits(16))
        except Exception as err:  # still one result for the one StartProbe
            self._internal_error("probe", err)
            outcome = cannot_probe(err)
        if not self._current(svc):
            return  # the service was reloaded away while the probe ran
        now = self._clock()
        try:
            self.act(svc, svc.feed(probe_result(backend, outcome, now), now))
        except Exception as err:
            self._internal_error("probe", err)
        self._after_probe()

    def cancel(self) -> None:
        """Stop the probes in flight (shutdown)."""
        for task in self.probes:
            task.cancel()


# A log line to write once the call's weights are out: level, format, its arguments, and
# the record's extra attributes (journald fields) or None.
Line = tuple[int, str, tuple, dict[str, str] | None]


def _line(level: int, message: str, *args) -> Line:
    return (level, message, args, None)
