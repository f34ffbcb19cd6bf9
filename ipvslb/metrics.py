"""Prometheus metrics, computed at scrape time from the same snapshot `ipvslb status` shows,
so the two can never disagree. Names follow node_exporter's `node_ipvs_*` style with an
`ipvslb_` prefix; docs/metrics.md lists them."""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from ipvslb import __version__
from ipvslb.snapshot import ConnectSeconds, StatusSnapshot

STATES = ("healthy", "suspect", "quarantined", "probing", "ramping", "disabled")
BACKEND_COUNTERS: dict[str, tuple[str, str]] = {
    "successes": ("ipvslb_backend_connects_established_total", "Connects to the backend that completed."),
    "quarantines": ("ipvslb_backend_quarantines_total", "Times the backend was taken out of rotation."),
}
RELOAD_OUTCOMES = ("ok", "failed")
# The daemon's long-lived tasks (ipvslb.daemon, Daemon._internal_error).
INTERNAL_TASKS = ("tick", "evidence", "probe", "verify", "udp_watch", "reload", "status", "metrics")
NOTIFY_COUNTERS = {
    "failures": "Notify hooks (settings.notify_command) that exited non-zero, could not be started or were "
                "killed at their timeout.",
    "dropped": "Health transitions whose notify hook never ran: dropped from a full backlog, or still "
               "waiting at shutdown.",
}
# Upper bounds in seconds: from a backend on the same link (100 us) to one whose SYN-ACK
# needed a retransmitted SYN (1 s and more).
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0)


class ConnectTimes:
    """Histogram of one backend's timed connects, as plain data for the status snapshot:
    cumulative bucket counts (the last one +Inf), count and sum."""

    def __init__(self) -> None:
        self._counts = [0] * (len(CONNECT_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> ConnectSeconds:
        cumulative, total = [], 0
        for count in self._counts:
            total += count
            cumulative.append(total)
        return ConnectSeconds(tuple(cumulative), self.sum)


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], StatusSnapshot]):
        self._snapshot = snapshot

    def collect(self) -> Iterator:
        doc = self._snapshot()
        labels = ["service", "backend"]
        state = GaugeMetricFamily("ipvslb_backend_state", "1 for the backend's current health state.",
                                  labels=[*labels, "state"])
        weight = GaugeMetricFamily("ipvslb_backend_weight", "Weight currently set in IPVS.", labels=labels)
        configured = GaugeMetricFamily("ipvslb_backend_configured_weight", "Weight from the configuration.",
                                       labels=labels)
        drained = GaugeMetricFamily("ipvslb_backend_drained", "1 while an operator has the backend drained "
                                    "(`ipvslb drain`): weight 0 whatever its health.", labels=labels)
        failures = CounterMetricFamily("ipvslb_backend_failures", "Failure evidence by class.",
                                       labels=[*labels, "class"])
        probes = CounterMetricFamily("ipvslb_backend_probes", "Direct probes by result.", labels=[*labels, "result"])
        counters = {k: CounterMetricFamily(name.removesuffix("_total"), doc_, labels=labels)
                    for k, (name, doc_) in BACKEND_COUNTERS.items()}
        frozen = GaugeMetricFamily("ipvslb_service_frozen",
                                   "1 while quarantines are frozen: the evidence says this host has no path to the "
                                   "backends.", labels=["service"])
        for svc in doc.services:
            frozen.add_metric([svc.name], float(svc.frozen))
            for b in svc.backends:
                lv = [svc.name, b.endpoint]
                c = b.counters
                for s in STATES:
                    state.add_metric([*lv, s], float(b.state == s))
                weight.add_metric(lv, b.weight)
                configured.add_metric(lv, b.configured_weight)
                drained.add_metric(lv, float(b.drained))
                failures.add_metric([*lv, "hard"], c.hard_failures)
                failures.add_metric([*lv, "soft"], c.soft_failures)
                probes.add_metric([*lv, "ok"], c.probes_ok)
                probes.add_metric([*lv, "failed"], c.probes_failed)
                for key, family in counters.items():
                    family.add_metric(lv, getattr(c, key))
        yield from (state, weight, configured, drained, failures, probes, *counters.values(), frozen)
        yield _connect_seconds(doc)

        build = GaugeMetricFamily("ipvslb_build_info", "1, labelled with the running daemon's version.",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        reloads = CounterMetricFamily("ipvslb_reloads", "Configuration reloads (SIGHUP) by outcome: failed is "
                                      "a file refused, or a change IPVS or the tracer refused and that was "
                                      "taken back; the configuration in force stays.", labels=["outcome"])
        for outcome in RELOAD_OUTCOMES:
            reloads.add_metric([outcome], doc.reloads.get(outcome, 0))
        yield reloads
        internal = CounterMetricFamily("ipvslb_internal_errors", "Exceptions a long-lived task of the daemon caught "
                                       "and carried past, by task: a bug, whose traceback is in the log.",
                                       labels=["task"])
        for task in INTERNAL_TASKS:
            internal.add_metric([task], doc.internal_errors.get(task, 0))
        yield internal
        for key, text in NOTIFY_COUNTERS.items():
            family = CounterMetricFamily(f"ipvslb_notify_{key}", text)
            family.add_metric([], getattr(doc.notify, key))
            yield family
        last = GaugeMetricFamily("ipvslb_last_reload_success_timestamp_seconds",
                                 "Unix time the configuration in force was loaded (start or reload).")
        last.add_metric([], doc.last_reload_success)
        yield last

        lost = CounterMetricFamily("ipvslb_tracer_lost_records", "Tracer records lost to a full ring buffer.")
        lost.add_metric([], doc.lost_records)
        yield lost
        missed = CounterMetricFamily("ipvslb_tracer_missed_runs",
                                     "Tracer program runs the kernel skipped because another tracing "
                                     "program was running on that CPU.")
        missed.add_metric([], doc.missed_runs)
        yield missed
        events = CounterMetricFamily("ipvslb_tracer_records", "Tracer records received, by kind.", labels=["kind"])
        for kind, count in doc.records.items():
            events.add_metric([kind], count)
        yield events
        counted = CounterMetricFamily("ipvslb_tracer_counted_connects",
                                      "Connects established that the tracer counted without records "
                                      "(not timed: see settings.tracer.sample_interval).")
        counted.add_metric([], doc.counted_successes)
        yield counted
        runs = CounterMetricFamily("ipvslb_reconcile_runs", "IPVS reconciliations run.")
        runs.add_metric([], doc.reconcile.runs)
        writes = CounterMetricFamily("ipvslb_reconcile_writes", "Netlink writes made by reconciliations.")
        writes.add_metric([], doc.reconcile.writes)
        seconds = GaugeMetricFamily("ipvslb_reconcile_last_duration_seconds", "Duration of the last reconciliation.")
        seconds.add_metric([], doc.reconcile.last_seconds)
        yield from (runs, writes, seconds)


def _connect_seconds(doc: StatusSnapshot) -> HistogramMetricFamily:
    family = HistogramMetricFamily("ipvslb_backend_connect_seconds",
                                   "Timed client connects by the backend that answered: from the client's "
                                   "SYN to the SYN-ACK.", labels=["service", "backend"])
    bounds = [*(str(b) for b in CONNECT_BUCKETS), "+Inf"]
    for svc in doc.services:
        for b in svc.backends:
            if b.connect_seconds is not None:
                family.add_metric([svc.name, b.endpoint], list(zip(bounds, b.connect_seconds.buckets, strict=True)),
                                  b.connect_seconds.sum)
    return family


def registry_for(snapshot: Callable[[], StatusSnapshot]) -> CollectorRegistry:
    """The snapshot's metrics, plus prometheus_client's standard process_* (CPU, memory, file
    descriptors) and python_* (interpreter, garbage collector) collectors."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
