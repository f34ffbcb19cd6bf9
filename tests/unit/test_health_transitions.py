"""The transition table (ipvslb/health/states.py): complete, consistent, and the engine's
only way to change a backend's state -- every entry is taken by the engine in a scenario,
and a transition the table lacks raises."""
import re
from collections import deque
from pathlib import Path

import pytest

from ipvslb.health import (
    IN_ROTATION,
    OUT_OF_ROTATION,
    TRANSITIONS,
    ConnectStarted,
    Event,
    IllegalTransition,
    State,
    engine,
)
from ipvslb.health.states import next_state
from ipvslb.model import Backend, HealthSettings, Service
from tests.unit.test_health import (
    A,
    B,
    build_history,
    make_engine,
    probe,
    quarantine,
    readmit,
    refuse,
    refused,
    transitions,
)

H, S, Q, P, R, D = (State.HEALTHY, State.SUSPECT, State.QUARANTINED, State.PROBING, State.RAMPING,
                    State.DISABLED)


def _successors(state):
    return {new for (old, _), new in TRANSITIONS.items() if old is state}


def _reachable(start):
    seen, todo = {start}, deque([start])
    while todo:
        for new in _successors(todo.popleft()) - seen:
            seen.add(new)
            todo.append(new)
    return seen


# --- the table on its own ---------------------------------------------------------------

def test_every_state_is_reachable_from_a_configured_backend():
    assert _reachable(H) == set(State)


def test_every_state_leads_back_to_healthy():
    assert all(H in _reachable(s) for s in State), {s: _reachable(s) for s in State}


def test_only_a_quarantine_takes_a_configured_backend_out_of_rotation():
    leaving = {(old, event) for (old, event), new in TRANSITIONS.items()
               if old in IN_ROTATION and new in OUT_OF_ROTATION}
    assert {event for _, event in leaving} == {Event.QUARANTINE}
    assert {old for old, _ in leaving} == set(IN_ROTATION)


def test_back_into_rotation_only_through_probes_a_guard_or_the_configuration():
    returning = {event for (old, event), new in TRANSITIONS.items() if old in OUT_OF_ROTATION and new in IN_ROTATION}
    assert returning == {Event.READMITTED, Event.READMITTED_AT_FULL_WEIGHT, Event.RELEASED, Event.HEALTH_DISABLED}


def test_a_withheld_quarantine_stays_in_rotation():
    assert all(new in IN_ROTATION for (_, event), new in TRANSITIONS.items() if event is Event.WITHHELD)


def test_a_disabled_backend_only_comes_back_through_the_configuration():
    assert {event for (old, event) in TRANSITIONS if old is D} == {Event.WEIGHT_RESTORED}
    assert {old for (old, event) in TRANSITIONS if event is Event.WEIGHT_ZERO} == set(State) - {D}


def test_a_transition_the_table_lacks_raises():
    missing = [(s, e) for s in State for e in Event if (s, e) not in TRANSITIONS]
    assert (D, Event.QUARANTINE) in missing and (H, Event.RELEASED) in missing
    for state, event in missing:
        with pytest.raises(IllegalTransition, match=f"from {state} on {event}"):
            next_state(state, event)


def test_every_event_the_engine_names_is_in_the_table_and_every_event_is_named():
    source = Path(engine.__file__).read_text()
    named = set(re.findall(r"\bEvent\.([A-Z_]+)", source))
    assert named == {e.name for e in Event}
    assert {e for _, e in TRANSITIONS} == set(Event)


# --- the engine takes every entry, and nothing else --------------------------------------

def reweigh(h, backend, weight, now):
    svc = h.service
    backends = tuple(Backend(b.address, b.port, weight) if b.key == backend else b for b in svc.backends)
    return h.update_service(Service(svc.name, svc.protocol, svc.vip, svc.port, backends, health=svc.health), now)


def keep_only(h, count, now):
    svc = h.service
    return h.update_service(Service(svc.name, svc.protocol, svc.vip, svc.port, svc.backends[:count],
                                    health=svc.health), now)


def health_off(h, now):
    svc = h.service
    return h.update_service(Service(svc.name, svc.protocol, svc.vip, svc.port, svc.backends,
                                    health=HealthSettings(enabled=False)), now)


def suspect_a(**kw):
    h = make_engine(**kw)
    refuse(h, A, 10.0)
    return h


def quarantined_a(**kw):
    h = make_engine(**kw)
    quarantine(h, A, 0.0)  # next probe at 1.01
    return h


def probing_a(**kw):
    h = quarantined_a(**kw)
    h.tick(1.01)
    return h


def ramping_a(**kw):
    h = quarantined_a(**kw)
    readmit(h, A, 1.01)  # ramp 2.03 .. 12.03
    return h


def suspect_again_in_probation():
    h = ramping_a()
    h.tick(12.1)  # ramp done; probation until 42.03
    build_history(h, A, 13.0)  # deadline trusted: the 200 ms floor
    h.feed(ConnectStarted(A, 922, 20.0), 20.0)
    h.tick(20.2)  # a missed deadline in probation: suspect, probed
    h.feed(ConnectStarted(A, 923, 20.25), 20.25)
    return h, lambda: h.tick(20.45)  # another one, while the probe is out


def ramping_and_the_last_in_rotation():
    h = ramping_a(n=2)
    quarantine(h, B, 3.0)
    return h, lambda: refuse(h, A, 4.0)


def readmitted(slow_start):
    h = probing_a(slow_start=slow_start)
    probe(h, A, True, 1.02)
    h.tick(2.02)
    return h, lambda: probe(h, A, True, 2.03)


SCENARIOS = {
    (H, Event.SUSPICION): lambda: (h := make_engine(), lambda: refuse(h, A, 10.0)),
    (S, Event.SUSPICION): suspect_again_in_probation,
    (H, Event.WITHHELD): lambda: (h := make_engine(n=1, failure_threshold=1), lambda: refuse(h, A, 10.0)),
    (R, Event.WITHHELD): ramping_and_the_last_in_rotation,
    (H, Event.QUARANTINE): lambda: (h := make_engine(failure_threshold=1), lambda: refuse(h, A, 10.0)),
    (S, Event.QUARANTINE): lambda: (h := suspect_a(), lambda: refused(h, A, 10.1)),
    (R, Event.QUARANTINE): lambda: (h := ramping_a(), lambda: refuse(h, A, 4.0)),
    (S, Event.PROBE_OK): lambda: (h := suspect_a(), lambda: probe(h, A, True, 10.1)),
    (Q, Event.PROBE_DUE): lambda: (h := quarantined_a(), lambda: h.tick(1.01)),
    (P, Event.PROBE_OK): lambda: (h := probing_a(), lambda: probe(h, A, True, 1.02)),
    (P, Event.PROBE_FAILED): lambda: (h := probing_a(), lambda: refused(h, A, 1.02)),
    (P, Event.READMITTED): lambda: readmitted(slow_start=10.0),
    (P, Event.READMITTED_AT_FULL_WEIGHT): lambda: readmitted(slow_start=0.0),
    (R, Event.RAMP_DONE): lambda: (h := ramping_a(), lambda: h.tick(12.1)),
    (Q, Event.RELEASED): lambda: (h := quarantined_a(n=2), lambda: keep_only(h, 1, 20.0)),
    (P, Event.RELEASED): lambda: (h := probing_a(n=2), lambda: keep_only(h, 1, 1.05)),
    (H, Event.WEIGHT_ZERO): lambda: (h := make_engine(), lambda: reweigh(h, A, 0, 20.0)),
    (S, Event.WEIGHT_ZERO): lambda: (h := suspect_a(), lambda: reweigh(h, A, 0, 20.0)),
    (Q, Event.WEIGHT_ZERO): lambda: (h := quarantined_a(), lambda: reweigh(h, A, 0, 0.5)),
    (P, Event.WEIGHT_ZERO): lambda: (h := probing_a(), lambda: reweigh(h, A, 0, 1.05)),
    (R, Event.WEIGHT_ZERO): lambda: (h := ramping_a(), lambda: reweigh(h, A, 0, 5.0)),
    (D, Event.WEIGHT_RESTORED): lambda: (h := make_engine(weights=[0, 10, 10]), lambda: reweigh(h, A, 10, 20.0)),
    (S, Event.HEALTH_DISABLED): lambda: (h := suspect_a(), lambda: health_off(h, 20.0)),
    (Q, Event.HEALTH_DISABLED): lambda: (h := quarantined_a(), lambda: health_off(h, 0.5)),
    (P, Event.HEALTH_DISABLED): lambda: (h := probing_a(), lambda: health_off(h, 1.05)),
    (R, Event.HEALTH_DISABLED): lambda: (h := ramping_a(), lambda: health_off(h, 5.0)),
}


def test_every_entry_of_the_table_has_a_scenario():
    assert set(SCENARIOS) == set(TRANSITIONS)


@pytest.mark.parametrize("entry", list(SCENARIOS), ids=lambda e: f"{e[0]}-{e[1].name}")
def test_the_engine_takes_the_transition(entry, monkeypatch):
    state, event = entry
    h, step = SCENARIOS[entry]()
    assert h.state(A) is state
    asked = []

    def spy(old, ev):
        asked.append((old, ev))
        return next_state(old, ev)

    monkeypatch.setattr(engine, "next_state", spy)
    actions = step()
    assert asked[0] == (state, event), asked
    assert transitions(actions)[0] == (A, state, TRANSITIONS[entry])
    assert h.state(A) is TRANSITIONS[entry]


def test_the_engine_refuses_a_transition_the_table_lacks():
    h = make_engine(weights=[0, 10, 10])
    with pytest.raises(IllegalTransition):
        h._quarantine(h._backends[A], 1.0, "a disabled backend is never judged", relapse=False)
    assert h.state(A) is D and h.weights()[A] == 0
    with pytest.raises(IllegalTransition):
        h._release(h._backends[B], 1.0, "only a backend out of rotation is released")
    assert h.state(B) is H
