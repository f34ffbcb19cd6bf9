"""Background checks (`active_interval`) as evidence: a failed check makes the backend
suspect and its confirmation probe decides, though clients' connects keep succeeding."""
from ipvslb.health import CheckResult, SetWeight, StartProbe, State
from tests.unit.test_health import A, B, C, build_history, connect_ok, make_engine, only, probe, transitions


def test_a_failed_check_of_a_backend_that_accepts_connects_takes_it_out_once_the_probe_fails():
    h = make_engine()
    for b in (A, B, C):
        build_history(h, b, 1.0)
    actions = h.feed(CheckResult(A, False, 5.0, "HTTP 503", refused=True), 5.0)
    assert transitions(actions) == [(A, State.HEALTHY, State.SUSPECT)]
    assert "active check failed: HTTP 503" in actions[0].evidence
    assert only(actions, StartProbe) and only(actions, StartProbe)[0].backend == A
    # Clients' connects still succeed (the backend accepts): they do not clear the suspicion.
    connect_ok(h, A, 5.01)
    actions = probe(h, A, False, 5.05, "HTTP 503", refused=True)
    assert transitions(actions) == [(A, State.SUSPECT, State.QUARANTINED)]
    assert only(actions, SetWeight)[0].weight == 0


def test_a_check_that_passes_or_fails_on_this_host_is_no_evidence_against_the_backend():
    h = make_engine()
    build_history(h, A, 1.0)
    assert h.feed(CheckResult(A, True, 5.0, "HTTP 200"), 5.0) == []
    assert h.feed(CheckResult(A, False, 5.1, "no route", local=True), 5.1) == []
    assert h.snapshot().backends[0].state == "healthy"


def test_a_passing_probe_clears_a_failed_check():
    h = make_engine()
    build_history(h, A, 1.0)
    h.feed(CheckResult(A, False, 5.0, "timed out"), 5.0)
    assert transitions(probe(h, A, True, 5.2, "HTTP 200")) == [(A, State.SUSPECT, State.HEALTHY)]
