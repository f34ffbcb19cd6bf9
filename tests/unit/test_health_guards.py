"""The guards: a confirmed failure goes out while a peer is usable now, never the last
usable backend, and a freeze only on evidence that the problem is this host's."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipvslb import health
from ipvslb.health import (
    IN_ROTATION,
    ConnectStarted,
    Established,
    FreezeLifted,
    FreezeReported,
    QuarantineWithheld,
    SetWeight,
    StartProbe,
    State,
    Successes,
    SynRetransmit,
)
from tests.unit.test_health import (
    A,
    B,
    C,
    D,
    build_history,
    connect_ok,
    key,
    make_engine,
    only,
    probe,
    quarantine,
    refuse,
    refused,
)

_ids = iter(range(500_000, 10**9))


def hang(h, backend, t):
    """A connect that gets no answer (a blackhole, or this host's path gone)."""
    conn = next(_ids)
    return h.feed(ConnectStarted(backend, conn, t), t)


def out(h):
    return {k for k, w in h.weights().items() if w == 0}


# --- confirmed failures with a usable peer --------------------------------------------

def test_2a_refused_then_blackholed_while_a_third_serves_both_out():
    h = make_engine(n=3)
    for k in (A, B, C):
        build_history(h, k, 0.0)  # 10 ms connects: 200 ms deadlines
    quarantine(h, A, 10.0)
    assert out(h) == {A}
    hang(h, B, 20.0)
    connect_ok(h, C, 20.05)  # C serves clients meanwhile
    actions = h.tick(20.2)  # B's deadline
    # B's probe; C is known usable, so no peer check (A's is its re-admission probe).
    assert {s.backend for s in only(actions, StartProbe)} == {A, B}
    actions = probe(h, B, False, 20.4, "no answer within 200 ms")  # one probe later: out
    assert SetWeight(B, 0, "quarantined: probe failed: no answer within 200 ms") in actions
    assert out(h) == {A, B} and not h.frozen


def test_2b_three_of_four_fail_one_after_another_all_three_out():
    h = make_engine(n=4)
    for k in (A, B, C, D):
        build_history(h, k, 0.0)
    quarantine(h, A, 10.0)             # refuses
    hang(h, B, 12.0)                   # blackholed
    connect_ok(h, C, 12.05)
    h.tick(12.2)
    probe(h, B, False, 12.4)
    refuse(h, C, 14.0)                 # refuses
    refused(h, C, 14.01)
    assert out(h) == {A, B, C} and h.state(D) is State.HEALTHY and not h.frozen


def test_all_refusing_leaves_one_in_and_no_freeze():
    h = make_engine(n=4)
    for i, k in enumerate((A, B, C, D)):
        quarantine(h, k, 10.0 + i * 0.01)  # refusals prove the path: not this host's fault
    assert len(out(h)) == 3 and not h.frozen


def test_idle_service_peer_checks_decide():
    h = make_engine(n=3)
    conn = next(_ids)  # the only connect there is; no history: the retransmit is the signal
    h.feed(ConnectStarted(A, conn, 5.0), 5.0)
    actions = h.feed(SynRetransmit(A, conn, 6.0, 1), 6.0)
    # Its own probe and, since no peer showed life since, peer checks with it.
    assert [s.backend for s in only(actions, StartProbe)] == [A, B, C]
    assert probe(h, A, False, 7.0, "no answer within 1000 ms") == []  # waits for the peers
    assert h.state(A) is State.SUSPECT
    actions = probe(h, B, True, 6.01, "connected")
    assert SetWeight(A, 0, "quarantined: probe failed: no answer within 1000 ms") in actions
    assert h.state(B) is State.HEALTHY


def test_a_peer_check_answered_first_lets_the_probe_decide_at_once():
    h = make_engine(n=3)
    conn = next(_ids)
    h.feed(ConnectStarted(A, conn, 5.0), 5.0)
    h.feed(SynRetransmit(A, conn, 6.0, 1), 6.0)
    probe(h, C, True, 6.01)
    assert h.state(A) is State.SUSPECT
    probe(h, A, False, 7.0)
    assert h.state(A) is State.QUARANTINED


def test_a_failed_peer_check_makes_that_peer_suspect():
    h = make_engine(n=3)
    conn = next(_ids)
    h.feed(ConnectStarted(A, conn, 5.0), 5.0)
    h.feed(SynRetransmit(A, conn, 6.0, 1), 6.0)
    actions = probe(h, B, False, 7.0, "no answer within 1000 ms")
    assert h.state(B) is State.SUSPECT and StartProbe(B, 1.0) in actions  # its own probe decides
    assert h.weights()[B] == 10


def test_peer_checks_are_bounded_per_service():
    h = make_engine(n=6)
    conn = next(_ids)
    h.feed(ConnectStarted(A, conn, 5.0), 5.0)
    actions = h.feed(SynRetransmit(A, conn, 6.0, 1), 6.0)
    assert len(only(actions, StartProbe)) == 1 + health.MAX_PEER_CHECKS


def test_a_stale_peer_success_does_not_make_it_usable_now():
    h = make_engine(n=2)
    build_history(h, A, 0.0)
    build_history(h, B, 0.0)  # B's last success: before A's connect began
    hang(h, A, 5.0)
    actions = h.tick(5.2)
    assert StartProbe(B, pytest.approx(0.2)) in actions  # B is asked
    probe(h, A, False, 5.4)
    assert h.state(A) is State.SUSPECT  # not out on B's old success alone
    probe(h, B, True, 5.21)
    assert h.state(A) is State.QUARANTINED


def test_max_quarantined_is_an_opt_in_cap():
    h = make_engine(n=4)
    for i, k in enumerate((A, B, C)):
        quarantine(h, k, 10.0 * i)
    assert out(h) == {A, B, C}  # no cap by default
    h = make_engine(n=4, max_quarantined=1)
    quarantine(h, A, 0.0)
    actions = quarantine(h, B, 10.0)
    assert only(actions, QuarantineWithheld)[0].guard == "max_quarantined (1) already out"


# --- the freeze: this host's evidence -------------------------------------------------

def _link_down(h, t, backends):
    """Every connect hangs, and every probe gets no answer."""
    for k in backends:
        hang(h, k, t)
    actions = h.tick(t + 0.2)
    for s in only(actions, StartProbe):
        actions += probe(h, s.backend, False, t + 0.4, "no answer within 200 ms")
    return actions


def test_2c_probes_to_every_backend_failing_together_freeze_and_all_come_back():
    h = make_engine(n=3)
    for k in (A, B, C):
        build_history(h, k, 0.0)
    actions = _link_down(h, 10.0, (A, B, C))
    (report,) = only(actions, FreezeReported)
    assert "probes to all 3 backends went unanswered together" in report.reason
    assert out(h) == set() and h.frozen
    assert {w.guard for w in only(actions, QuarantineWithheld)} == {"quarantines frozen"}
    # Re-probes while the path is still gone change nothing.
    for _ in range(3):
        t = h.next_deadline()
        for s in only(h.tick(t), StartProbe):
            probe(h, s.backend, False, t + 0.2)
    assert out(h) == set()
    # The path is back: the first life lifts the freeze, the rest are asked at once.
    t = h.next_deadline() - 0.5
    actions = connect_ok(h, B, t)
    assert only(actions, FreezeLifted) and not h.frozen
    actions = h.tick(t + 0.01)
    for s in only(actions, StartProbe):
        probe(h, s.backend, True, t + 0.02)
    assert all(h.state(k) is State.HEALTHY for k in (A, B, C)) and out(h) == set()


def test_a_local_probe_error_freezes_and_is_no_evidence_against_the_backend():
    h = make_engine(n=3)
    for k in (A, B, C):
        build_history(h, k, 0.0)
    hang(h, A, 10.0)
    actions = h.tick(10.2)  # A suspect, peers asked
    for s in only(actions, StartProbe):
        actions += probe(h, s.backend, False, 10.2, "ENETUNREACH (Network is unreachable)", local=True)
    assert h.frozen and out(h) == set()
    assert "on this host" in only(actions, FreezeReported)[0].reason
    row = h.snapshot().backends[1]
    assert row.state == "healthy" and row.failure_streak == 0  # the peer checks count nothing


def test_a_local_error_for_one_backend_while_others_serve_withholds_without_freeze():
    h = make_engine(n=3)
    for k in (A, B, C):
        build_history(h, k, 0.0)
    hang(h, A, 10.0)
    connect_ok(h, B, 10.05)
    h.tick(10.2)
    actions = probe(h, A, False, 10.2, "EHOSTUNREACH (No route to host)", local=True)
    assert only(actions, QuarantineWithheld)[0].guard == "no path from this host"
    assert not h.frozen and out(h) == set()


def test_failures_of_different_backends_at_different_times_are_not_a_freeze():
    h = make_engine(n=4)
    for k in (A, B, C, D):
        build_history(h, k, 0.0)
    quarantine(h, A, 10.0)
    quarantine(h, B, 10.5)  # two refusals within half a second: not this host's path
    assert out(h) == {A, B} and not h.frozen


# --- slow is not dead -----------------------------------------------------------------

def test_slow_backend_with_retransmits_whose_connects_establish_is_never_quarantined():
    """A backend 1.2 s away: every connect sees its first SYN retransmit at 1 s and is
    established at 1.2 s; its probes take 1.2 s too."""
    h = make_engine(n=3)
    build_history(h, B, 0.0)
    build_history(h, C, 0.0)
    rtt = 1.2
    outstanding: dict = {}
    t = 10.0
    while t < 40.0:
        conn = next(_ids)
        h.feed(ConnectStarted(A, conn, t), t)
        h.feed(SynRetransmit(A, conn, t + 1.0, 1), t + 1.0)
        for s in only(h.tick(t + 1.0), StartProbe):
            outstanding[s.backend] = (t + 1.0, s.timeout)
        h.feed(Established(A, conn, t + rtt, rtt), t + rtt)
        connect_ok(h, B, t + 1.1)
        for backend, (start, timeout) in list(outstanding.items()):
            if t + rtt >= start + min(timeout, rtt):
                del outstanding[backend]
                ok = backend != A or timeout >= rtt
                for s in only(probe(h, backend, ok, start + min(timeout, rtt)), StartProbe):
                    outstanding[s.backend] = (start + min(timeout, rtt), s.timeout)
        assert h.state(A) in IN_ROTATION and h.weights()[A] == 10
        t += 0.5
    row = h.snapshot().backends[0]
    assert row.counters.quarantines == 0 and row.failure_streak == 0


def test_syn_retransmits_alone_do_not_add_up_to_a_quarantine():
    h = make_engine(n=3)
    for i in range(5):
        conn = next(_ids)
        h.feed(ConnectStarted(A, conn, 5.0 + i * 0.02), 5.0 + i * 0.02)
        h.feed(SynRetransmit(A, conn, 6.0 + i * 0.02, 1), 6.0 + i * 0.02)
    assert h.state(A) is State.SUSPECT and h.snapshot().backends[0].failure_streak == 0


def test_blackhole_without_history_is_out_at_the_first_retransmit_plus_one_probe():
    h = make_engine(n=3)
    conn = next(_ids)
    h.feed(ConnectStarted(A, conn, 5.0), 5.0)
    connect_ok(h, B, 5.5)
    actions = h.feed(SynRetransmit(A, conn, 6.0, 1), 6.0)
    assert only(actions, StartProbe) == [StartProbe(A, 1.0)]  # B shows life: no peer check needed
    probe(h, A, False, 7.0)
    assert h.state(A) is State.QUARANTINED


# --- properties -----------------------------------------------------------------------

KINDS = ["refuse", "ok", "counted", "hang", "retransmit", "probe_ok", "probe_fail", "probe_refused",
         "probe_local", "tick"]
event_strategy = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 5), st.floats(0.0, 3.0)),
                          max_size=100)


@settings(max_examples=300, deadline=None)
@given(events=event_strategy, n=st.integers(1, 6))
def test_guards_hold_under_any_evidence(events, n):
    h = make_engine(n=n, seed=1, probe_jitter=0.2, connect_history_min=2)
    backends = [key(i) for i in range(n)]
    for k in backends:
        build_history(h, k, 0.0, n=2)
    probe_started: dict = {}
    last_success: dict = {}
    last_failure: dict = {}  # a hang never ends: it counts as a failure for ever after
    now = 1.0

    def record(actions, t):
        for s in only(actions, StartProbe):
            probe_started[s.backend] = t

    for kind, i, dt in events:
        now += dt
        b = backends[i % n]
        fresh_peer = any(
            p != b and h.state(p) in IN_ROTATION and b in probe_started
            and last_success.get(p, -1.0) >= probe_started[b] and last_failure.get(p, -1.0) < last_success[p]
            for p in backends)
        confirming = (h.state(b) is State.SUSPECT
                      and h.snapshot().backends[i % n].probe_outstanding)
        actions: list = []
        if kind == "refuse":
            actions = refuse(h, b, now)
            last_failure[b] = now
        elif kind == "ok":
            actions = connect_ok(h, b, now)
            last_success[b] = now + 0.01
        elif kind == "counted":
            actions = h.feed(Successes(b, 3, now), now)
            last_success[b] = now
        elif kind == "hang":
            actions = hang(h, b, now)
            last_failure[b] = float("inf")
        elif kind == "retransmit":
            conn = next(_ids)
            actions = h.feed(ConnectStarted(b, conn, now - 1.0), now)
            actions += h.feed(SynRetransmit(b, conn, now, 1), now)
            last_failure[b] = now
        elif kind == "probe_ok":
            actions = probe(h, b, True, now)
            if b in probe_started:
                last_success[b] = max(last_success.get(b, -1.0), probe_started[b])
        elif kind in ("probe_fail", "probe_refused", "probe_local"):
            actions = probe(h, b, False, now, refused=kind == "probe_refused", local=kind == "probe_local")
            last_failure[b] = now
            if kind != "probe_local" and confirming and fresh_peer:
                # (b) a confirmed failure with a usable peer is out within one probe
                assert h.state(b) not in IN_ROTATION, (b, h.snapshot())
        else:
            actions = h.tick(now)
            deadline = h.next_deadline()
            assert deadline is None or deadline > now  # tick always makes progress
        record(actions, now)
        # (a) never the last usable backend
        assert any(h.state(k) in IN_ROTATION for k in backends)
        assert any(w > 0 for w in h.weights().values())


def test_a_failed_peer_check_leads_to_the_freeze_within_one_more_probe():
    """Two backends, this host's path to both gone, only A had a connect: A's probe and the
    peer check of B go unanswered, B's own probe too; then the evidence is complete."""
    h = make_engine(n=2)
    build_history(h, A, 0.0)
    build_history(h, B, 0.0)
    hang(h, A, 10.0)
    actions = h.tick(10.2)
    assert [s.backend for s in only(actions, StartProbe)] == [A, B]
    probe(h, A, False, 10.4)
    assert not h.frozen and h.state(A) is State.SUSPECT  # waits for B's answer
    actions = probe(h, B, False, 10.4)
    assert h.state(B) is State.SUSPECT and only(actions, StartProbe) == [StartProbe(B, pytest.approx(0.2))]
    actions = probe(h, B, False, 10.6)
    assert h.frozen and only(actions, FreezeReported) and out(h) == set()


def test_backends_taken_out_while_this_host_was_losing_its_path_go_back_in_with_the_freeze():
    """The path to each backend goes a little after the previous one (links one by one): the
    first goes out while the others still serve; when every one is silent it is this host's
    failure, and what went out for it goes back in."""
    h = make_engine(n=3)
    for k in (A, B, C):
        build_history(h, k, 0.0)
    hang(h, A, 10.0)
    connect_ok(h, B, 10.05)
    connect_ok(h, C, 10.15)
    hang(h, B, 10.16)
    hang(h, C, 10.3)
    h.tick(10.2)
    probe(h, A, False, 10.4)
    assert out(h) == {A}  # B and C had shown life since A's connect began
    h.tick(10.36)
    probe(h, B, False, 10.56)
    assert out(h) == {A, B}  # C had too
    h.tick(10.5)
    actions = probe(h, C, False, 10.7)
    assert h.frozen and "probes to all 3 backends went unanswered together" in only(actions, FreezeReported)[0].reason
    assert out(h) == set() and all(h.state(k) is State.SUSPECT for k in (A, B, C))


def test_a_backend_out_on_a_refusal_stays_out_when_the_rest_go_silent():
    h = make_engine(n=3)
    for k in (A, B, C):
        build_history(h, k, 0.0)
    quarantine(h, A, 10.0)
    hang(h, B, 10.1)
    hang(h, C, 10.1)
    h.tick(10.3)
    probe(h, B, False, 10.5)
    actions = probe(h, C, False, 10.5)
    assert h.frozen and "probes to all 2 backends" in only(actions, FreezeReported)[0].reason
    assert out(h) == {A}


def test_a_drained_backend_is_not_the_usable_peer_that_lets_the_last_other_one_go_out():
    h = make_engine(n=2)
    build_history(h, A, 1.0)
    build_history(h, B, 1.0)
    h.set_drained({A})
    refuse(h, B, 5.0)
    actions = refused(h, B, 5.01)
    assert [w.guard for w in only(actions, QuarantineWithheld)] == ["last usable backend"]
    assert h.weights()[B] == 10
    h.set_drained(())  # undrained: A serves again, and B's next refused probe takes it out
    t = h.next_deadline()
    assert t is not None
    h.tick(t)
    refused(h, B, t + 0.01)
    assert h.weights()[B] == 0
