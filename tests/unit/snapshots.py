"""Status snapshots for tests: every field at a plain default unless given."""
from __future__ import annotations

from typing import Any

from ipvslb.health.states import State
from ipvslb.snapshot import (
    BackendCounters,
    BackendSnapshot,
    NotifyCounts,
    ReconcileCounts,
    ServiceSnapshot,
    StatusSnapshot,
)


def backend(endpoint: str = "10.0.1.1:80", **fields: Any) -> BackendSnapshot:
    address, _, port = endpoint.rpartition(":")
    values: dict[str, Any] = dict(
        endpoint=endpoint, address=address.strip("[]"), port=int(port), state=State.HEALTHY, weight=1,
        configured_weight=1, since=0.0, last_evidence=None, last_evidence_at=None, last_success_at=None,
        withheld=None, failure_streak=0, probe_outstanding=False, next_probe_at=None, backoff=1.0,
        probation_until=None, connect_p99=None, connect_deadline=None, counters=BackendCounters(),
        transitions={})
    values.update(fields)
    return BackendSnapshot(**values)


def service(name: str = "web", backends: tuple[BackendSnapshot, ...] | list[BackendSnapshot] = (),
            **fields: Any) -> ServiceSnapshot:
    values: dict[str, Any] = dict(name=name, protocol="tcp", vip="10.0.0.1:80", frozen=False, freeze_reason=None)
    values.update(fields)
    return ServiceSnapshot(backends=tuple(backends), **values)


def snapshot(services: tuple[ServiceSnapshot, ...] | list[ServiceSnapshot] = (), **fields: Any) -> StatusSnapshot:
    values: dict[str, Any] = dict(
        version="1", pid=7, now=100.0, started=0.0, attribution="kprobe", lost_records=0, missed_runs=0,
        records={}, counted_successes=0, reconcile=ReconcileCounts(0, 0, 0.0), reloads={}, internal_errors={},
        heartbeats={}, notify=NotifyCounts(0, 0), last_reload_success=1.7e9)
    values.update(fields)
    return StatusSnapshot(services=tuple(services), **values)
