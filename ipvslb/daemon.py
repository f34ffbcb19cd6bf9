"""`ipvslb run`: the imperative shell around the pure parts.

config -> IPVS reconcile -> tracer (VIP filter) -> health -> weight changes, on one asyncio
loop: the tracer's ring buffer, health timers, probes, signals (SIGHUP reload, SIGTERM and
SIGINT exit leaving IPVS as it is), the status socket, metrics and sd_notify.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import gc
import logging
import os
import random
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ipvslb import (
    __version__,
    actions,
    activecheck,
    config,
    conntrack,
    control,
    health,
    journal,
    metrics,
    notify,
    probe,
    statedir,
    status,
    systemd,
    udpwatch,
)
from ipvslb.ipvs import ApplyError, IPVSError, Manager
from ipvslb.ipvs.specs import ip, service_spec
from ipvslb.model import Config, Service, ServiceKey, format_endpoint
from ipvslb.snapshot import NotifyCounts, ReconcileCounts, ServiceSnapshot, StatusSnapshot
from ipvslb.tracer import Tracer, TracerUnavailable, records

log = logging.getLogger("ipvslb")


class StartupError(RuntimeError):
    """A precondition is missing; the message says what to install or enable."""


@dataclass
class ReconcileStats:
    runs: int = 0
    writes: int = 0
    last_seconds: float = 0.0


class Daemon:
    def __init__(self, config_path: str, cfg: Config, rng: random.Random | None = None,
                 manager_factory=Manager, tracer_factory=Tracer, prober=probe):
        self.config_path = config_path
        # The kernel's ends, replaceable so that the daemon runs in tests without a kernel.
        self._manager_factory, self._tracer_factory, self.prober = manager_factory, tracer_factory, prober
        # task -> exceptions caught (ipvslb_internal_errors_total); kinds already logged.
        self.internal_errors: collections.Counter[str] = collections.Counter()
        self._errors_logged: set[tuple] = set()
        self._error_backoff = 0.0  # no tick before this (monotonic): no busy loop on a bug
        # "tick", "evidence" -> monotonic time of their last run without exception (watchdog).
        self.heartbeats: dict[str, float] = {}
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False
        self._hup_early = False
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.health: dict[tuple, health.ServiceHealth] = {}
        self.records: collections.Counter[str] = collections.Counter()
        # Successes the tracer counted without records: total, and its last count per pair.
        self.counted_successes = 0
        self._counted = records.CountedSince()
        self.reconcile = ReconcileStats()
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._drain_handle: asyncio.TimerHandle | None = None
        # (service key, backend) -> the timed connects' histogram, for metrics.
        self.connect_times: dict[tuple, metrics.ConnectTimes] = collections.defaultdict(metrics.ConnectTimes)
        self.reloads: collections.Counter[str] = collections.Counter()
        self.last_reload_success = time.time()  # the configuration in force: loaded at start

    # -- start-up ------------------------------------------------------------------------

    def _open_kernel(self) -> None:
        try:
            self.manager = self._manager_factory(self.cfg.settings)
        except IPVSError as err:
            raise StartupError(f"IPVS is unavailable ({err.strerror or err}): `modprobe ip_vs` must work; "
                               "install the kernel's modules (linux-image-*) or enable CONFIG_IP_VS") from err
        try:
            self.tracer = self._tracer_factory(self.cfg.settings.tracer)
        except TracerUnavailable as err:
            self.manager.close()
            raise StartupError(str(err)) from err
        self.rescuer = conntrack.Rescuer()
        self.rescuer.prepare()
        self._start_executor()

    def _start_executor(self) -> None:
        s = self.cfg.settings
        self.notifier = notify.Notifier(s.notify_command, s.notify_timeout, s.notify_concurrency)
        self.executor = actions.Executor(
            self.manager, self.rescuer, self.prober, notifier=self.notifier, rng=self.rng,
            internal_error=self._internal_error,
            current=lambda svc: self.health.get(svc.service.key) is svc, after_probe=self._schedule_tick)
        self.active_checks = activecheck.ActiveChecks(self._checked, wanted=self._check_wanted, rng=self.rng)

    def _check_wanted(self, service: Service, backend: tuple) -> bool:
        """Background checks look for failures in rotation; a backend out of it is the
        re-admission probes' business."""
        svc = self.health.get(service.key)
        return svc is not None and svc.state(backend) in (health.State.HEALTHY, health.State.RAMPING)

    def _checked(self, service: Service, backend: tuple, outcome: probe.ProbeOutcome) -> None:
        """A background check's outcome is evidence (health.CheckResult); the engine decides."""
        svc = self.health.get(service.key)
        if svc is None:
            return
        now = time.monotonic()
        result = health.CheckResult(backend, outcome.ok, now, outcome.detail, local=outcome.local,
                                    refused=outcome.refused)
        self.executor.act(svc, svc.feed(result, now))
        self._schedule_tick()

    def _observed_weights(self, services: tuple[Service, ...]) -> dict[tuple, dict]:
        """Weights in the kernel now, for services that exist there (restart continuity)."""
        kernel = {ks.spec.key: ks.spec for ks in self.manager.ipvs.services()}
        observed = {}
        for svc in services:
            spec = kernel.get(service_spec(svc).key)
            if spec is None:
                continue
            weights = {(d.spec.address, d.spec.port): d.spec.weight for d in self.manager.ipvs.dests(spec)}
            # A drained backend's 0 is the operator's, not a quarantine to resume.
            observed[svc.key] = {b.key: weights[(b.address.packed, b.port)] for b in svc.backends
                                 if (b.address.packed, b.port) in weights
                                 and (svc.key, b.key) not in self.manager.drains}
        return observed

    def _start_health(self, now: float) -> None:
        observed = self._observed_weights(self.cfg.services)
        for svc in self.cfg.services:
            self.health[svc.key] = health.ServiceHealth(svc, self.rng, now, observed.get(svc.key))
            self._hold_wanted_weights(svc)
        self._sync_drains()

    def _sync_drains(self, services: Iterable[health.ServiceHealth] | None = None) -> None:
        """Tell health (of `services`, by default all) which backends are drained: none of
        them is a usable peer."""
        drained: dict[ServiceKey, list] = {}
        for service, backend in self.manager.drains:
            drained.setdefault(service, []).append(backend)
        for svc in self.health.values() if services is None else services:
            svc.set_drained(drained.get(svc.service.key, ()))

    def _hold_wanted_weights(self, svc: Service) -> None:
        """Tell IPVS's manager which weights health wants, so apply writes them (or nothing
        when the kernel already has them) instead of restoring configured weights."""
        for backend, weight in self.health[svc.key].weights().items():
            self.manager.hold_weight(svc.key, backend, weight)

    def _apply(self, routine: bool = False, verify: bool = True) -> None:
        """Read IPVS back in full (unless not `verify`: then from the manager's snapshot) and
        make it match the configuration. `routine` is logged only when it had something to repair."""
        started = time.monotonic()
        try:
            result = self.manager.apply(self.cfg.services, verify=verify)
            writes = result.writes
        except ApplyError as err:
            log.error("IPVS reconcile: %s", err)
            writes = err.result.writes
        except OSError as err:
            if not routine:
                raise
            # Keep the periodic task alive: the next verify starts from the kernel again.
            log.error("IPVS reconcile: %s", err)
            writes = 0
        self.reconcile.runs += 1
        self.reconcile.writes += writes
        self.reconcile.last_seconds = time.monotonic() - started
        log.log(logging.DEBUG if routine and not writes else logging.INFO,
                "IPVS reconciled: %d services, %d netlink writes, %.1f ms", len(self.cfg.services), writes,
                self.reconcile.last_seconds * 1000)

    def _internal_error(self, task: str, err: BaseException) -> None:
        """An exception a long-lived task did not expect: counted, its traceback logged the
        first time (per task and error), and the task carries on."""
        self.internal_errors[task] += 1
        if task in ("tick", "evidence"):
            self._error_backoff = time.monotonic() + ERROR_BACKOFF
        kind = (task, type(err).__name__, str(err)[:200])
        if kind in self._errors_logged or len(self._errors_logged) > 1000:
            log.debug("internal error in %s again (%d so far): %r", task, self.internal_errors[task], err)
            return
        self._errors_logged.add(kind)
        log.error("internal error in %s (%d so far; the task carries on): %r", task, self.internal_errors[task],
                  err, exc_info=err)

    async def _supervised(self, task: str, run) -> None:
        """`run()` again whenever it ends in an exception (after a pause, not in a loop)."""
        while True:
            try:
                await run()
                return
            except Exception as err:
                self._internal_error(task, err)
            await asyncio.sleep(ERROR_RESTART)

    async def _verify_ipvs(self) -> None:
        """Repair changes others made to our services (an `ipvsadm -d` by hand)."""
        while True:
            await asyncio.sleep(self.cfg.settings.ipvs_verify_interval)
            self._apply(routine=True)

    # -- evidence in, actions out --------------------------------------------------------

    def _service_for(self, protocol: str, vip: tuple) -> health.ServiceHealth | None:
        return self.health.get((protocol, vip[0], vip[1]))

    def _on_records(self) -> None:
        try:
            if self._feed_records():
                self._drain_again()
        except Exception as err:
            self._internal_error("evidence", err)
        # In full: evidence moves deadlines later too (a connect that established), and a
        # tick left at an old deadline would tick every service for nothing.
        self._schedule_tick()

    def _drain_again(self) -> None:
        # Routine records do not wake us while they keep coming (Tracer.fileno): read again
        # one wakeup interval after the last batch, until a read finds nothing.
        if self._drain_handle is not None:
            self._drain_handle.cancel()
        self._drain_handle = asyncio.get_running_loop().call_later(
            self.tracer.wakeup_interval, self._on_drain_timer)

    def _on_drain_timer(self) -> None:
        self._drain_handle = None
        self._on_records()

    def _feed_records(self) -> int:
        """Feed health what the tracer saw since the last call: its records in the order
        they happened, then the successes it only counted. Returns how many there were."""
        now = time.monotonic()
        batch = self.tracer.read()
        failed = 0
        for event in batch:
            try:
                self._feed_event(event, now)
            except Exception as err:  # one bad record must not cost the rest of the batch
                self._internal_error("evidence", err)
                failed += 1
        # After the records' actions: a refusal's weight 0 should not wait for the counts.
        # Health does not let a success end a failure streak that began after it (it
        # compares their times).
        counted = self._newly_counted()
        for c, count in sorted(counted, key=lambda item: item[0].ts):
            if svc := self._service_for(c.protocol, c.vip):
                try:
                    self.executor.act(svc, svc.feed(health.Successes(c.backend, count, c.ts), now))
                except Exception as err:
                    self._internal_error("evidence", err)
        # A batch whose every record failed is a reader that does not work (the watchdog's
        # concern); one bad record among good ones is not.
        if not batch or failed < len(batch):
            self.heartbeats["evidence"] = time.monotonic()
        return len(batch) + len(counted)

    def _feed_event(self, event: records.ConnEvent, now: float) -> None:
        self.records[event.kind.label] += 1
        svc = self._service_for(event.protocol, event.vip)
        found = health.evidence_from(event)
        if event.kind is records.Kind.UNREACHABLE and event.backend is not None:
            # Only the backend's own ICMP reaches this record (the tracer never reports
            # IPVS's), so it is the hard failure health/engine.py's contract allows.
            found = health.UdpUnreachable(event.backend, event.ts, records.unreachable_reason(event))
        if svc is not None and found is not None:
            if isinstance(found, health.Established) and found.connect_time is not None:
                self.connect_times[(svc.service.key, found.backend)].observe(found.connect_time)
            self.executor.act(svc, svc.feed(found, now))

    def _newly_counted(self) -> list[tuple[records.Counted, int]]:
        """Per (VIP, backend), the connects the kernel counted since the last call."""
        if not self.tracer.sample_interval:
            return []
        fresh = self._counted.new(self.tracer.counted())
        self.counted_successes += sum(count for _, count in fresh)
        return fresh

    def _tick(self) -> None:
        self._tick_handle = None
        # A connect that established just before its deadline may still sit in the ring
        # buffer, unannounced: read it before judging the deadline.
        try:
            if self._feed_records():
                self._drain_again()
        except Exception as err:
            self._internal_error("evidence", err)
        now = time.monotonic()
        failed = False
        for svc in list(self.health.values()):
            try:
                self.executor.act(svc, svc.tick(now))
            except Exception as err:  # one service's fault must not stop the others' timers
                self._internal_error("tick", err)
                failed = True
        if not failed:
            self.heartbeats["tick"] = time.monotonic()
        self._schedule_tick()

    def _schedule_tick(self, changed: Iterable[health.ServiceHealth] | None = None) -> None:
        """The tick at the earliest deadline of all services; with `changed`, only these
        changed since the tick was scheduled, and only to bring it earlier: the others'
        deadlines are not read again (a reload's new services). A tick that comes before
        anything is due does nothing, and schedules in full."""
        if changed is not None and self._tick_handle is not None:
            try:
                soonest = min((d for svc in changed if (d := svc.next_deadline()) is not None), default=None)
            except Exception as err:
                self._internal_error("tick", err)
                soonest = time.monotonic() + ERROR_RESTART
            if soonest is not None and max(soonest, self._error_backoff) < self._tick_handle.when():
                self._tick_handle.cancel()
                self._tick_handle = asyncio.get_running_loop().call_at(max(soonest, self._error_backoff), self._tick)
            return
        try:
            deadlines = [d for svc in self.health.values() if (d := svc.next_deadline()) is not None]
        except Exception as err:
            self._internal_error("tick", err)
            deadlines = [time.monotonic() + ERROR_RESTART]
        if deadlines and self._error_backoff > min(deadlines):
            deadlines = [self._error_backoff]
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if deadlines:
            # loop.time() is time.monotonic(), the clock health is fed with.
            self._tick_handle = asyncio.get_running_loop().call_at(min(deadlines), self._tick)

    async def _watch_udp(self) -> None:
        """Feed UDP services with evidence from their packet counts (the tracer's, else IPVS's),
        read `udpwatch.STEPS` times per reply window (the shortest of the services')."""
        watches: dict[tuple, udpwatch.ReplyWatch] = {}
        while True:
            udp = [svc for svc in self.health.values()
                   if svc.service.protocol == "udp" and svc.settings.enabled]
            for svc in udp:
                window = svc.settings.udp_reply_window
                if svc.service.key not in watches or watches[svc.service.key].window != window:
                    watches[svc.service.key] = udpwatch.ReplyWatch(window)
            await asyncio.sleep(min((watches[svc.service.key].interval for svc in udp), default=0.25))
            now = time.monotonic()
            # The tracer's counts are current; IPVS's lag its 2 s estimator (udpwatch).
            counted = self.tracer.udp_counts() if udp and self.tracer.udp_counting else None
            for svc in udp:
                if counted is not None:
                    vip = (svc.service.vip, svc.service.port)
                    current = {b.key: counted.get((vip, b.key), (0, 0)) for b in svc.service.backends}
                else:
                    try:
                        dests = self.manager.ipvs.dests(service_spec(svc.service), stats=True)
                    except OSError as err:
                        log.debug("%s: no UDP counters: %s", svc.service.name, err)
                        continue
                    current = {(ip(d.spec.address), d.spec.port): (d.stats.inpkts, d.stats.outpkts)
                               for d in dests if d.stats is not None}
                for evidence in watches[svc.service.key].judge(current, now):
                    self.executor.act(svc, svc.feed(evidence, now))
            self._schedule_tick()

    # -- reload --------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        """One reload at a time; a SIGHUP during one asks for one more after it."""
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reloads())

    async def _reloads(self) -> None:
        while True:
            self._reload_again = False
            _notify_reloading()
            # Parsing a large file takes seconds: off the loop, which keeps judging evidence.
            self._reload(await asyncio.to_thread(self._load))
            if not self._reload_again:
                return

    def reload(self) -> None:
        """The SIGHUP reload, parsing on the calling thread."""
        _notify_reloading()
        self._reload(self._load())

    def _load(self) -> Config | None:
        """The file, parsed; None, logged, when it cannot be used."""
        try:
            return config.load(self.config_path)
        except config.ConfigError as err:
            for line in err.messages:
                log.error("reload refused, nothing changed: %s", line)
        except Exception as err:  # a ValueError or MemoryError the checks did not foresee
            log.error("reload refused, nothing changed: %s: %s: %s", self.config_path, type(err).__name__, err)
        return None

    def _reload(self, new: Config | None) -> None:
        """Switch to `new`, all or nothing; READY=1 whatever happens (it follows RELOADING=1)."""
        status = "reload failed, the previous configuration stays in force (see the log)"
        try:
            if new is not None and self._switch(new):
                self.reloads["ok"] += 1
                self.last_reload_success = time.time()
                log.info("reloaded %s: %d services", self.config_path, len(new.services))
                status = self._status_line()
            else:
                self.reloads["failed"] += 1
        except Exception as err:
            self.reloads["failed"] += 1
            self._internal_error("reload", err)
        finally:
            systemd.notify("READY=1", f"STATUS={status}")

    def _switch(self, new: Config) -> bool:
        """IPVS, then the tracer's VIP filter, then config and health: the new ones replace
        the old only when IPVS and the filter took them. False (logged) when they did not:
        IPVS is put back to the configuration in force."""
        if new.settings != self.cfg.settings:
            log.warning("reload: changes under 'settings' take effect at the next restart")
            new = Config(settings=self.cfg.settings, services=new.services)
        now = time.monotonic()
        # (service, its health in force or None, its trial health); keys of addresses are
        # slow to hash, so each service's once.
        trials: list[tuple[Service, health.ServiceHealth | None, health.ServiceHealth]] = []
        for svc in new.services:
            key = svc.key
            current = self.health.get(key)
            if current is None:
                trial = health.ServiceHealth(svc, self.rng, now)
            elif svc is not current.service and svc != current.service:
                # A copy, to learn the weights it wants: the one in force (with its probes
                # in flight) changes only once the switch is sure.
                trial = copy.deepcopy(current, {id(self.rng): self.rng})
                trial.update_service(svc, now)
            else:
                trials.append((svc, current, current))
                continue  # its weights are held already: IPVS plans it from its cached specs
            trials.append((svc, current, trial))
            for backend, weight in trial.weights().items():
                self.manager.hold_weight(key, backend, weight)
        started = time.monotonic()
        try:
            # Planned from the snapshot, not a full read: with 200 services that read is
            # 201 netlink dumps, seconds of CPU under emulation for a one-service change.
            # The verify timer still repairs others' changes within ipvs_verify_interval.
            result = self.manager.apply(new.services, verify=False)
            self.reconcile.writes += result.writes
            self.tracer.set_vips(new.services)
        except Exception as err:
            log.error("reload failed, the previous configuration stays in force: %s", err)
            self._roll_back()
            return False
        finally:
            self.reconcile.runs += 1
            self.reconcile.last_seconds = time.monotonic() - started
        pending: list[tuple[health.ServiceHealth, list]] = []
        kept: dict[ServiceKey, health.ServiceHealth] = {}
        changed: list[health.ServiceHealth] = []
        missed = False  # whether a weight held for the trial is not the one wanted now
        for svc, current, trial in trials:
            if trial is current:
                kept[svc.key] = trial
                continue
            if current is None:
                kept[svc.key] = trial
            else:  # the one in force takes the change: its probes in flight land on it
                pending.append((current, current.update_service(svc, now)))
                kept[svc.key] = current
                missed = missed or current.weights() != trial.weights()
            changed.append(kept[svc.key])
        self._forget_connect_times(kept)
        self.health = kept
        self.cfg = new
        # Drains end only with their backends (Manager.apply), which only changed services lose.
        self._sync_drains(changed)
        self.active_checks.update(new.services)
        for svc_health in changed:
            self._hold_wanted_weights(svc_health.service)
        if missed:
            self._apply(routine=True, verify=False)
        for held, decided in pending:
            self.executor.act(held, [a for a in decided if not isinstance(a, health.SetWeight)])
        self._schedule_tick(changed)
        return True

    def _forget_connect_times(self, kept: dict[ServiceKey, health.ServiceHealth]) -> None:
        """Drop the connect-time histograms of backends that leave with this reload (`kept`:
        the services' health after it). Only the services in force that it does not keep as
        the very same objects are looked at."""
        left = {id(svc): svc for svc in self.cfg.services}
        for held in kept.values():
            left.pop(id(held.service), None)
        for svc in left.values():
            after = kept.get(svc.key)
            staying = {b.key for b in after.service.backends} if after is not None else set()
            for b in svc.backends:
                if b.key not in staying:
                    self.connect_times.pop((svc.key, b.key), None)

    def _roll_back(self) -> None:
        """IPVS and the VIP filter back to the configuration in force, best effort (the
        periodic verify retries IPVS)."""
        try:
            for svc in self.cfg.services:
                self._hold_wanted_weights(svc)
            self._apply(routine=True)
            self.tracer.set_vips(self.cfg.services)
        except Exception as err:
            self._internal_error("reload", err)

    # -- status --------------------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        return StatusSnapshot(
            version=__version__,
            pid=os.getpid(),
            now=time.monotonic(),
            started=self.started,
            attribution=self.tracer.attribution,
            lost_records=self.tracer.lost_records(),
            missed_runs=self.tracer.missed_runs(),
            records=dict(self.records),
            counted_successes=self.counted_successes,
            reconcile=ReconcileCounts(self.reconcile.runs, self.reconcile.writes, self.reconcile.last_seconds),
            reloads=dict(self.reloads),
            internal_errors=dict(self.internal_errors),
            heartbeats=dict(self.heartbeats),
            notify=NotifyCounts(**self.notifier.counters()),
            last_reload_success=self.last_reload_success,
            services=tuple(self._service_snapshot(svc) for svc in self.health.values()),
        )

    def _service_snapshot(self, svc: health.ServiceHealth) -> ServiceSnapshot:
        doc = svc.snapshot()
        keys = {format_endpoint(b.key): b.key for b in svc.service.backends}
        history = self.executor.weight_history
        rows = []
        for row in doc.backends:
            key = (svc.service.key, keys.get(row.endpoint))
            hist = self.connect_times.get(key)
            drained = key in self.manager.drains   # health's state goes on; IPVS has 0
            rows.append(dataclasses.replace(
                row, weight_history=tuple(history.get(key, ())), connect_seconds=hist.snapshot() if hist else None,
                drained=drained, weight=0 if drained else row.weight))
        return dataclasses.replace(doc, backends=tuple(rows))

    def _control(self, data: bytes) -> dict:
        """A request on the control socket (ipvslb.control), answered."""
        answer = control.execute(control.parse(data, self.cfg.services), self.manager)
        self._sync_drains()
        return answer

    def _status_line(self) -> str:
        out = sum(svc.out_of_rotation() for svc in self.health.values())
        return f"{len(self.health)} services, {out} backends out of rotation"

    # -- main ----------------------------------------------------------------------------

    async def run(self) -> None:
        from ipvslb import preflight

        # Before anything slow: SIGHUP's default action ends the process, and systemd
        # counts that as a clean exit (no restart). One that comes early is a reload once ready.
        signal.signal(signal.SIGHUP, self._early_sighup)
        # Before the tracer compile: a setting that stops the daemon after it would cost a
        # compile (seconds to minutes) at every systemd restart.
        if problem := preflight.settings_problem(self.cfg.settings):
            raise StartupError(problem)
        try:
            lock = statedir.lock(self.cfg.settings.state_dir)
        except statedir.Locked as err:
            raise StartupError(str(err)) from err
        try:
            await self._run()
        finally:
            lock.close()

    def _early_sighup(self, signum, frame) -> None:
        self._hup_early = True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._open_kernel()
        log.info("ipvslb %s: tracer compiled in %.1f s, backend attribution: %s, UDP unreachables: %s, "
                 "UDP replies: %s", __version__, self.tracer.compile_seconds, self.tracer.attribution,
                 "traced" if self.tracer.udp_unreachables else "not traced (no kprobes)",
                 "counted by the tracer" if self.tracer.udp_counting else "IPVS's counters (2 s late)")
        # After the compile (seconds of CPU that should not outrank the host's own work) and
        # before the status and metrics threads start (threads inherit it).
        set_nice(self.cfg.settings.nice)
        self._start_health(time.monotonic())
        self._apply()
        self.tracer.set_vips(self.cfg.services)
        loop.add_reader(self.tracer.fileno(), self._on_records)
        # Checked before the compile; still refused here if another process took them since.
        try:
            server = await status.serve(self.cfg.settings.status_socket, self._status_snapshot)
        except status.SocketPathTaken as err:
            raise StartupError(str(err)) from err
        except OSError as err:
            raise StartupError(f"status socket {self.cfg.settings.status_socket}: {err.strerror or err}") from err
        try:
            control_server = await control.serve(self.cfg.settings.control_path(), self._control)
        except (status.SocketPathTaken, OSError) as err:
            server.close()
            raise StartupError(str(err) if isinstance(err, status.SocketPathTaken) else
                               f"control socket {self.cfg.settings.control_path()}: {err.strerror or err}") from err
        try:
            self._start_metrics(loop)
        except OSError as err:
            server.close()
            control_server.close()
            raise StartupError(f"cannot listen on settings.metrics_address {self.cfg.settings.metrics_address}: "
                               f"{err.strerror or err}") from err
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        watchdog = loop.create_task(self._watchdog())
        udp_watch = loop.create_task(self._supervised("udp_watch", self._watch_udp))
        self.active_checks.update(self.cfg.services)
        active_checks = loop.create_task(self._supervised("active_checks", self.active_checks.run))
        verify = loop.create_task(self._supervised("verify", self._verify_ipvs))
        self._schedule_tick()
        # What start-up made (bcc, pyroute2, prometheus_client, the configuration) lives as
        # long as the daemon. Frozen, it is out of the collector's sight: a full collection
        # walks only what came later instead of pausing the loop for tens of milliseconds,
        # long enough to delay a quarantine (60 ms measured in the test VM).
        gc.collect()
        gc.freeze()
        systemd.notify("READY=1", f"STATUS={self._status_line()}")
        log.info("running: %s", self._status_line())
        if self._hup_early:
            self._on_sighup()
        try:
            await self._stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            log.info("stopping; IPVS is left as it is")
            watchdog.cancel()
            if self._reload_task is not None:
                self._reload_task.cancel()
            udp_watch.cancel()
            active_checks.cancel()
            verify.cancel()
            self.executor.cancel()
            # No evidence and no timer after this point: the tracer and IPVS close below,
            # while the loop still runs what is scheduled.
            loop.remove_reader(self.tracer.fileno())
            if self._drain_handle is not None:
                self._drain_handle.cancel()
            if self._tick_handle is not None:
                self._tick_handle.cancel()
                self._tick_handle = None
            # The hooks running now end (each is killed at settings.notify_timeout); the
            # waiting ones are dropped.
            await self.notifier.close()
            server.close()
            control_server.close()
            self.tracer.close()
            self.rescuer.close()
            self.manager.close()

    def _start_metrics(self, loop: asyncio.AbstractEventLoop) -> None:
        address = self.cfg.settings.metrics_address
        if not address:
            return
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")

        def snapshot_from_loop() -> StatusSnapshot:
            # Scrapes run in prometheus_client's thread; the state belongs to the loop.
            return asyncio.run_coroutine_threadsafe(_call(self._metrics_snapshot), loop).result(timeout=5)

        # A daemon thread: it ends with the process (0.16, Debian 12's, returns no handle).
        start_http_server(int(port), addr=host.strip("[]"), registry=metrics.registry_for(snapshot_from_loop))

    def _status_snapshot(self) -> dict:
        try:
            return self.snapshot().to_json()
        except Exception as err:
            self._internal_error("status", err)
            return {"error": f"internal error: {err!r}"}

    def _metrics_snapshot(self) -> StatusSnapshot:
        try:
            return self.snapshot()
        except Exception as err:
            self._internal_error("metrics", err)
            raise

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            if self._alive():
                systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _alive(self) -> bool:
        """A tick now, deadline or not (it reads the tracer too): alive if both it and the
        evidence reader ran through. If they keep failing, systemd is not told we are alive
        and restarts the daemon."""
        started = time.monotonic()
        self._tick()
        stalled = [task for task in ("tick", "evidence") if self.heartbeats.get(task, -1.0) < started]
        if stalled:
            log.error("watchdog not fed: %s failed (ipvslb_internal_errors_total)", " and ".join(stalled))
        return not stalled


ERROR_BACKOFF = 0.05  # seconds without ticks after a tick or evidence exception
ERROR_RESTART = 1.0   # seconds before a task that ended in an exception starts again


def _notify_reloading() -> None:
    systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def set_nice(nice: int | None) -> None:
    """Evidence is worth milliseconds only if the daemon gets a CPU when it arrives: on a
    busy host the applications it balances for compete for that CPU."""
    if nice is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as err:
        log.warning("cannot set nice %d (%s): reactions to evidence wait for the CPU like any process; "
                    "grant CAP_SYS_NICE or set settings.nice to null", nice, err.strerror or err)
    else:
        log.info("running at nice %d", nice)


async def _call(fn):
    return fn()


def main(config_path: str) -> int:
    try:
        cfg = config.load(config_path)
    except config.ConfigError as err:
        for line in err.messages:
            print(line, flush=True)
        return 1
    journal.setup_logging(cfg.settings.log_level)
    try:
        asyncio.run(Daemon(config_path, cfg).run())
    except StartupError as err:
        log.critical("cannot start: %s", err)
        return 1
    return 0
