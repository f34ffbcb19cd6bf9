"""The status snapshot: its JSON document (the status socket's) has the keys scripts read,
and reads back to the same snapshot; a document of another shape is refused naming the key."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ipvslb.health.backend import COUNTERS
from ipvslb.health.states import State
from ipvslb.snapshot import BackendCounters, ConnectSeconds, SnapshotError, StatusSnapshot
from tests.unit import snapshots
from tests.unit.test_metrics import _tcp_connects, running  # noqa: F401

# The document's keys, as `ipvslb status --json`, the kernel tests and the demo read them.
TOP_KEYS = {"version", "pid", "now", "started", "attribution", "lost_records", "missed_runs", "records",
            "counted_successes", "reconcile", "reloads", "internal_errors", "heartbeats", "notify",
            "last_reload_success", "services"}
SERVICE_KEYS = {"name", "protocol", "vip", "frozen", "freeze_reason", "backends"}
BACKEND_KEYS = {"endpoint", "address", "port", "state", "weight", "configured_weight", "since", "last_evidence",
                "last_evidence_at", "last_success_at", "withheld", "failure_streak", "probe_outstanding",
                "next_probe_at", "backoff", "probation_until", "connect_p99", "connect_deadline", "counters",
                "transitions", "weight_history"}
OPTIONAL_BACKEND_KEYS = {"connect_seconds", "drained"}   # only when timed, only when drained


def full() -> StatusSnapshot:
    """A snapshot with every optional part present."""
    return snapshots.snapshot(
        [snapshots.service("web", frozen=True, freeze_reason="no path", backends=[
            snapshots.backend("10.0.1.1:80", state=State.QUARANTINED, weight=0, last_evidence="probe failed",
                              counters=BackendCounters(quarantines=1, probes_failed=2),
                              transitions={"healthy->suspect": 1, "suspect->quarantined": 1},
                              weight_history=((1.5, 0), (2.5, 3)), connect_seconds=ConnectSeconds((0, 1, 2), 0.25),
                              drained=True),
            snapshots.backend("[fd00::1]:80", next_probe_at=3.0)])],
        records={"connect": 4}, reloads={"ok": 1}, internal_errors={"tick": 2}, heartbeats={"tick": 99.5})


def through_the_socket(snap: StatusSnapshot) -> StatusSnapshot:
    return StatusSnapshot.from_json(json.loads(json.dumps(snap.to_json())))


def test_a_snapshot_reads_back_from_its_json():
    snap = full()
    assert through_the_socket(snap) == snap
    assert through_the_socket(snapshots.snapshot()) == snapshots.snapshot()


def test_the_json_has_the_documented_keys_and_the_optional_ones_only_when_set():
    doc = full().to_json()
    assert set(doc) == TOP_KEYS
    assert set(doc["reconcile"]) == {"runs", "writes", "last_seconds"}
    assert set(doc["notify"]) == {"failures", "dropped"}
    (svc,) = doc["services"]
    assert set(svc) == SERVICE_KEYS
    drained, plain = svc["backends"]
    assert set(drained) == BACKEND_KEYS | OPTIONAL_BACKEND_KEYS and set(plain) == BACKEND_KEYS
    assert set(drained["counters"]) == set(COUNTERS)
    assert drained["state"] == "quarantined" and drained["drained"] is True
    assert drained["weight_history"] == [[1.5, 0], [2.5, 3]]
    assert drained["connect_seconds"] == {"buckets": [0, 1, 2], "sum": 0.25}


def test_the_daemons_snapshot_reads_back_and_has_the_keys(running):  # noqa: F811
    svc, backend = _tcp_connects(running, "api", [0.001, 0.002])
    running.manager.drains = frozenset({(svc.key, backend)})
    snap = running.snapshot()
    assert through_the_socket(snap) == snap
    doc = json.loads(json.dumps(running._status_snapshot()))
    assert set(doc) == TOP_KEYS
    rows = [b for s in doc["services"] for b in s["backends"]]
    timed = [b for b in rows if "connect_seconds" in b]
    assert len(timed) == 1 and timed[0]["drained"] is True and timed[0]["connect_seconds"]["buckets"][-1] == 2
    assert all(set(b) - OPTIONAL_BACKEND_KEYS == BACKEND_KEYS for b in rows)
    assert all(set(b) == BACKEND_KEYS for b in rows if b is not timed[0])


def test_the_counters_are_healths():
    assert tuple(f.name for f in dataclasses.fields(BackendCounters)) == COUNTERS


def edited(edit) -> dict:
    doc = json.loads(json.dumps(full().to_json()))
    edit(doc)
    return doc


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("pid"), "pid: missing"),
    (lambda d: d.update(color="red"), "color: unknown key"),
    (lambda d: d.update(pid="7"), "pid: expected int, got str '7'"),
    (lambda d: d.update(pid=True), "pid: expected int, got bool True"),
    (lambda d: d.update(now=None), "now: expected float, got null"),
    (lambda d: d.update(services={}), "services: expected a list, got dict {}"),
    (lambda d: d["notify"].pop("dropped"), "notify.dropped: missing"),
    (lambda d: d["records"].update(connect="4"), "records.connect: expected int, got str '4'"),
    (lambda d: d["services"][0]["backends"][1].pop("counters"), "services[0].backends[1].counters: missing"),
    (lambda d: d["services"][0]["backends"][0]["counters"].update(resets=1),
     "services[0].backends[0].counters.resets: unknown key"),
    (lambda d: d["services"][0]["backends"][0].update(state="sleepy"),
     "services[0].backends[0].state: str 'sleepy' is not a health state"),
    (lambda d: d["services"][0]["backends"][0].update(weight_history=[[1.0]]),
     "services[0].backends[0].weight_history[0]: expected 2 items, got 1"),
    (lambda d: d.update(services=[5]), "services[0]: expected an object, got int 5"),
])
def test_a_document_of_another_shape_is_refused_naming_the_key(edit, message):
    with pytest.raises(SnapshotError) as err:
        StatusSnapshot.from_json(edited(edit))
    assert str(err.value).startswith(message), str(err.value)


def test_optional_backend_keys_may_be_absent_and_a_number_may_be_an_int():
    doc = edited(lambda d: d["services"][0]["backends"][0].pop("drained"))
    doc["now"] = 100
    snap = StatusSnapshot.from_json(doc)
    assert snap.services[0].backends[0].drained is False and snap.now == 100.0 and isinstance(snap.now, float)
