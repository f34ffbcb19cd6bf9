"""The health engine with a fake clock (plain floats) and seeded randomness.

Most tests set probe_jitter=0 so that probe times are exact; jitter has its own tests.
"""
import ipaddress
import random

import pytest

from ipvslb import health, metrics, status
from ipvslb.health import (
    ClosedInSynSent,
    ConnectStarted,
    Established,
    ProbeResult,
    QuarantineWithheld,
    ResetInSynSent,
    ServiceHealth,
    SetWeight,
    StartProbe,
    State,
    Successes,
    SynRetransmit,
    Transition,
    UdpNoReply,
    UdpReplied,
    UdpUnreachable,
)
from ipvslb.model import Backend, HealthSettings, Service
from ipvslb.tracer.records import ConnEvent, Kind
from tests.unit import snapshots

VIP = ipaddress.ip_address("10.90.0.1")


def key(i: int):
    return (ipaddress.ip_address(f"10.77.0.{i + 1}"), 8080)


A, B, C, D = key(0), key(1), key(2), key(3)


def make_service(n=3, weights=None, protocol="tcp", **health_settings):
    health_settings.setdefault("probe_jitter", 0.0)
    weights = weights or [10] * n
    backends = tuple(Backend(key(i)[0], key(i)[1], w) for i, w in enumerate(weights))
    return Service("web", protocol, VIP, 80, backends, health=HealthSettings(**health_settings))


def make_engine(n=3, now=0.0, seed=7, initial_weights=None, **kw):
    return ServiceHealth(make_service(n, **kw), random.Random(seed), now, initial_weights=initial_weights)


def only(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def transitions(actions):
    return [(a.backend, a.old_state, a.new_state) for a in only(actions, Transition)]


_conn_ids = iter(range(1, 10**9))


def refuse(h, backend, t):
    """One connect answered by RST."""
    conn = next(_conn_ids)
    return h.feed(ConnectStarted(backend, conn, t), t) + h.feed(ResetInSynSent(backend, conn, t + 0.001), t + 0.001)


def connect_ok(h, backend, t, connect_time=0.010):
    conn = next(_conn_ids)
    return (h.feed(ConnectStarted(backend, conn, t), t)
            + h.feed(Established(backend, conn, t + connect_time, connect_time), t + connect_time))


def build_history(h, backend, t, n=20, connect_time=0.010):
    for i in range(n):
        connect_ok(h, backend, t + i * 0.001, connect_time)


def quarantine(h, backend, now):
    """RST, then the confirming probe fails: the normal path into quarantine."""
    refuse(h, backend, now)
    return h.feed(ProbeResult(backend, False, now + 0.01, "ECONNREFUSED", refused=True), now + 0.01)


def probe(h, backend, ok, now, detail="", *, refused=False, local=False):
    return h.feed(ProbeResult(backend, ok, now, detail, local=local, refused=refused), now)


def refused(h, backend, now):
    """The backend's probe is refused: its path works and it serves no one."""
    return probe(h, backend, False, now, "ECONNREFUSED", refused=True)


def readmit(h, backend, now):
    """From quarantined with the default 1 s backoff: two probes 1 s apart succeed."""
    h.tick(now)
    probe(h, backend, True, now + 0.01)
    h.tick(now + 1.01)
    return probe(h, backend, True, now + 1.02)


# --- evidence from tracer records -------------------------------------------------------

def test_evidence_from_maps_tracer_records():
    def rec(kind, **kw):
        base = dict(kind=kind, ts=5.0, sock=42, protocol="tcp", client=(VIP, 40000), vip=(VIP, 80), backend=A)
        return ConnEvent(**{**base, **kw})

    assert health.evidence_from(rec(Kind.CONNECT)) == ConnectStarted(A, 42, 5.0)
    assert health.evidence_from(rec(Kind.ESTABLISHED, elapsed=0.02)) == Established(A, 42, 5.0, 0.02)
    assert health.evidence_from(rec(Kind.ESTABLISHED_UNTIMED)) == Established(A, 42, 5.0, None)
    assert health.evidence_from(rec(Kind.RESET)) == ResetInSynSent(A, 42, 5.0)
    assert health.evidence_from(rec(Kind.SYN_RETRANSMIT, retransmits=1)) == SynRetransmit(A, 42, 5.0, 1)
    assert health.evidence_from(rec(Kind.CLOSED_SYN_SENT)) == ClosedInSynSent(A, 42, 5.0)
    assert health.evidence_from(rec(Kind.CLOSED)) is None
    assert health.evidence_from(rec(Kind.CONNECT, backend=None)) is None
    assert health.evidence_from(rec(Kind.BACKEND, protocol="udp", sock=0)) is None


def test_unknown_event_type_is_a_programming_error():
    with pytest.raises(TypeError):
        make_engine().feed(object(), 0.0)


# --- healthy -> suspect -> healthy / quarantined ----------------------------------------

def test_reset_in_syn_sent_makes_the_backend_suspect_and_starts_a_probe():
    h = make_engine()
    actions = refuse(h, A, 10.0)
    assert transitions(actions) == [(A, State.HEALTHY, State.SUSPECT)]
    assert "RST in SYN_SENT" in only(actions, Transition)[0].evidence
    assert only(actions, StartProbe) == [StartProbe(A, 1.0)]  # no history yet: 1 s
    assert not only(actions, SetWeight)  # suspicion alone changes no weight
    assert h.weights()[A] == 10


def test_successful_probe_clears_suspicion():
    h = make_engine()
    refuse(h, A, 10.0)
    actions = probe(h, A, True, 10.1, "connected")
    assert transitions(actions) == [(A, State.SUSPECT, State.HEALTHY)]
    assert only(actions, Transition)[0].evidence == "probe ok: connected"
    assert h.snapshot().backends[0].failure_streak == 0


def test_failed_probe_quarantines_a_refusing_backend():
    h = make_engine()
    refuse(h, A, 10.0)
    actions = refused(h, A, 10.1)
    assert transitions(actions) == [(A, State.SUSPECT, State.QUARANTINED)]
    assert only(actions, SetWeight) == [SetWeight(A, 0, "quarantined: probe failed: ECONNREFUSED")]
    assert h.weights() == {A: 0, B: 10, C: 10}
    assert h.snapshot().backends[0].counters.quarantines == 1


def test_quarantine_weight_is_configurable():
    h = make_engine(quarantine_weight=1)
    quarantine(h, A, 10.0)
    assert h.weights()[A] == 1 and h.state(A) is State.QUARANTINED


def test_failure_threshold_quarantines_without_waiting_for_the_probe():
    h = make_engine()
    refuse(h, A, 10.0)
    refuse(h, A, 10.1)
    assert h.state(A) is State.SUSPECT
    actions = refuse(h, A, 10.2)
    assert transitions(actions) == [(A, State.SUSPECT, State.QUARANTINED)]
    assert "3 consecutive failures" in only(actions, Transition)[0].evidence
    # The confirmation probe still out is consumed and changes nothing.
    assert probe(h, A, True, 10.3) == []
    assert h.state(A) is State.QUARANTINED


def test_failure_threshold_one_quarantines_on_the_first_failure():
    h = make_engine(failure_threshold=1)
    actions = refuse(h, A, 10.0)
    assert transitions(actions) == [(A, State.HEALTHY, State.QUARANTINED)]


def test_established_resets_the_failure_streak():
    h = make_engine()
    refuse(h, A, 10.0)
    refuse(h, A, 10.1)
    connect_ok(h, A, 10.2)
    refuse(h, A, 10.3)
    refuse(h, A, 10.4)
    assert h.state(A) is State.SUSPECT  # 2 since the success, threshold 3


def test_counted_successes_reset_the_streak_and_count_but_time_nothing():
    h = make_engine(connect_history_min=1)
    refuse(h, A, 10.0)
    refuse(h, A, 10.1)
    assert h.feed(Successes(A, 5, 10.2), 10.2) == []
    refuse(h, A, 10.3)
    refuse(h, A, 10.4)
    assert h.state(A) is State.SUSPECT  # 2 since the successes, threshold 3
    row = h.snapshot().backends[0]
    assert row.counters.successes == 5
    assert row.connect_deadline is None  # counted connects carry no connect time


def test_a_counted_success_fed_after_a_later_failure_does_not_end_the_streak():
    # The daemon feeds counted successes after the records of the same read: a success
    # from before the failure must not wipe the failure out of the streak.
    h = make_engine()
    refuse(h, A, 10.0)
    refuse(h, A, 10.2)
    assert h.feed(Successes(A, 4, 10.1), 10.3) == []
    actions = refuse(h, A, 10.4)
    assert (A, State.SUSPECT, State.QUARANTINED) in transitions(actions)  # 3 in a row
    assert h.snapshot().backends[0].counters.successes == 4
    assert h.snapshot().backends[0].last_success_at == 10.1


def test_counted_successes_for_unknown_or_disabled_backends_are_ignored():
    h = make_engine(weights=[10, 10, 0])
    assert h.feed(Successes(D, 3, 1.0), 1.0) == []
    assert h.feed(Successes(C, 3, 1.0), 1.0) == []
    assert [r.counters.successes for r in h.snapshot().backends] == [0, 0, 0]


def test_established_does_not_clear_suspicion_the_probe_decides():
    h = make_engine()
    refuse(h, A, 10.0)
    assert connect_ok(h, A, 10.05) == []
    assert h.state(A) is State.SUSPECT
    actions = refused(h, A, 10.1)
    assert h.state(A) is State.QUARANTINED and transitions(actions)


def test_client_closing_in_syn_sent_is_ignored():
    h = make_engine()
    build_history(h, A, 0.0)
    h.feed(ConnectStarted(A, 900, 5.0), 5.0)
    assert h.feed(ClosedInSynSent(A, 900, 5.1), 5.1) == []
    assert h.tick(6.0) == []  # its deadline no longer applies
    assert h.state(A) is State.HEALTHY
    assert h.snapshot().backends[0].counters.client_closes_in_syn_sent == 1


# --- soft failures: SYN retransmit and the adaptive deadline ----------------------------

def test_first_syn_retransmit_is_a_soft_failure_without_history():
    h = make_engine()
    h.feed(ConnectStarted(A, 901, 5.0), 5.0)
    assert h.next_deadline() is None  # no trusted deadline yet: the retransmit is the signal
    actions = h.feed(SynRetransmit(A, 901, 6.0, 1), 6.0)
    assert transitions(actions) == [(A, State.HEALTHY, State.SUSPECT)]
    assert only(actions, Transition)[0].evidence == "first SYN retransmit"
    assert h.snapshot().backends[0].counters.soft_failures == 1
    assert h.feed(SynRetransmit(A, 901, 8.0, 2), 8.0) == []  # later ones add nothing


def test_missed_adaptive_deadline_is_a_soft_failure():
    h = make_engine()
    build_history(h, A, 0.0, connect_time=0.010)  # p99 10 ms -> deadline = floor 200 ms
    h.feed(ConnectStarted(A, 902, 5.0), 5.0)
    assert h.next_deadline() == pytest.approx(5.2)
    assert h.tick(5.19) == []
    actions = h.tick(5.2)
    assert transitions(actions) == [(A, State.HEALTHY, State.SUSPECT)]
    assert "no SYN-ACK within 200 ms" in only(actions, Transition)[0].evidence
    # Its own probe, and peer checks: no other backend has shown life since the connect began.
    assert only(actions, StartProbe) == [StartProbe(A, pytest.approx(0.2)), StartProbe(B, 1.0), StartProbe(C, 1.0)]


def test_connect_within_the_deadline_is_a_success():
    h = make_engine()
    build_history(h, A, 0.0)
    h.feed(ConnectStarted(A, 903, 5.0), 5.0)
    h.feed(Established(A, 903, 5.15, 0.15), 5.15)
    assert h.next_deadline() is None
    assert h.tick(10.0) == []


def test_an_untimed_established_ends_its_connect_as_a_success_and_adds_no_connect_time():
    # The tracer saw this connect established only later (the kernel skipped it at the
    # transition): without the record its deadline would pass and count as a failure.
    h = make_engine()
    build_history(h, A, 0.0, connect_time=0.010)
    successes = h.snapshot().backends[0].counters.successes
    h.feed(ConnectStarted(A, 905, 5.0), 5.0)
    assert h.feed(Established(A, 905, 5.9, None), 5.9) == []
    assert h.next_deadline() is None
    assert h.tick(10.0) == []
    row = h.snapshot().backends[0]
    assert h.state(A) is State.HEALTHY
    assert row.counters.successes == successes + 1
    assert row.connect_deadline == pytest.approx(0.2)  # the 0.9 s it looked like is not a sample


def test_deadline_adapts_to_a_slow_but_healthy_backend():
    h = make_engine()
    build_history(h, A, 0.0, connect_time=0.300)  # 300 ms away: deadline 4 x 300 = 1.2 s
    assert h.snapshot().backends[0].connect_deadline == pytest.approx(1.2)
    h.feed(ConnectStarted(A, 904, 5.0), 5.0)
    assert h.tick(5.9) == []
    # A retransmit is normal for such a backend; its deadline judges, not the retransmit.
    assert h.feed(SynRetransmit(A, 904, 6.0, 1), 6.0) == []
    assert h.feed(Established(A, 904, 6.1, 1.1), 6.1) == []
    assert h.state(A) is State.HEALTHY


def test_backend_that_suddenly_gets_slower_is_probed_again_not_quarantined():
    h = make_engine()
    build_history(h, A, 0.0, connect_time=0.001)  # 1 ms history: deadline and probe timeout 200 ms
    h.feed(ConnectStarted(A, 905, 5.0), 5.0)
    actions = h.tick(5.2)  # the path is now 300 ms long: the deadline is missed
    assert only(actions, StartProbe)[0] == StartProbe(A, pytest.approx(0.2))
    h.feed(Established(A, 905, 5.3, 0.3), 5.3)  # the client connect succeeds late
    actions = probe(h, A, False, 5.4, "timed out")
    # Not quarantined: asked again, allowing 4 x 300 ms.
    assert h.state(A) is State.SUSPECT and h.weights()[A] == 10
    assert only(actions, StartProbe) == [StartProbe(A, pytest.approx(1.2))]
    assert "client connect succeeded in 300 ms" in h.snapshot().backends[0].last_evidence
    actions = probe(h, A, True, 5.7)
    assert transitions(actions) == [(A, State.SUSPECT, State.HEALTHY)]


def test_missed_deadlines_in_flight_do_not_add_up_to_a_quarantine():
    h = make_engine()  # failure_threshold 3
    build_history(h, A, 0.0, connect_time=0.001)
    for i, t in enumerate((5.0, 5.06, 5.12, 5.18)):
        h.feed(ConnectStarted(A, 910 + i, t), t)
    h.tick(5.2)
    h.tick(5.26)
    h.tick(5.32)
    h.tick(5.38)
    assert h.state(A) is State.SUSPECT and h.weights()[A] == 10
    # A blackhole: no late success, the probe times out and decides (B serves meanwhile).
    connect_ok(h, B, 5.3)
    probe(h, A, False, 5.4, "no answer within 200 ms")
    assert h.state(A) is State.QUARANTINED


def test_a_failed_probe_still_quarantines_when_no_slower_connect_succeeded():
    h = make_engine()
    build_history(h, A, 0.0, connect_time=0.001)
    h.feed(ConnectStarted(A, 906, 5.0), 5.0)
    h.tick(5.2)
    h.feed(Established(B, 907, 5.25, 0.01), 5.25)  # another backend's success is no proof (but a usable peer)
    connect_ok(h, A, 5.26, connect_time=0.002)      # a fast one that slipped through is not either
    probe(h, A, False, 5.4, "timed out")
    assert h.state(A) is State.QUARANTINED


def test_deadline_never_below_the_floor():
    h = make_engine(connect_deadline_floor=0.5)
    build_history(h, A, 0.0, connect_time=0.001)
    assert h.snapshot().backends[0].connect_deadline == 0.5


def test_deadline_needs_connect_history_min_samples():
    h = make_engine(connect_history_min=5)
    build_history(h, A, 0.0, n=4)
    assert h.snapshot().backends[0].connect_deadline is None
    connect_ok(h, A, 1.0)
    assert h.snapshot().backends[0].connect_deadline == pytest.approx(0.2)


def test_probe_timeout_is_derived_like_the_deadline():
    h = make_engine()
    build_history(h, A, 0.0, n=3, connect_time=0.4)  # too few to trust, but seen: 4 x 0.4
    assert only(refuse(h, A, 5.0), StartProbe) == [StartProbe(A, pytest.approx(1.6))]
    build_history(h, B, 0.0, n=20, connect_time=0.1)  # trusted: max(0.2, 0.4)
    assert only(refuse(h, B, 5.0), StartProbe) == [StartProbe(B, pytest.approx(0.4))]


def test_one_connection_counts_one_failure():
    h = make_engine()
    build_history(h, A, 0.0)
    h.feed(ConnectStarted(A, 905, 5.0), 5.0)
    h.tick(5.2)  # deadline missed
    h.feed(SynRetransmit(A, 905, 6.0, 1), 6.0)
    h.feed(ResetInSynSent(A, 905, 6.5), 6.5)
    counters = h.snapshot().backends[0].counters
    assert (counters.soft_failures, counters.hard_failures) == (1, 0)
    assert h.snapshot().backends[0].failure_streak == 0  # a missed deadline: the probe decides


def test_connect_rescheduled_by_ipvs_is_timed_on_its_new_backend():
    h = make_engine()
    h.feed(ConnectStarted(A, 906, 5.0), 5.0)
    h.feed(SynRetransmit(A, 906, 6.0, 1), 6.0)  # A is blackholed
    h.feed(ConnectStarted(B, 906, 6.0), 6.0)  # IPVS moved the SYN to B (expire_nodest_conn)
    h.feed(Established(B, 906, 6.01, 1.01), 6.01)  # elapsed since the first SYN: 1.01 s
    assert h.snapshot().backends[1].connect_p99 == pytest.approx(0.01)
    assert h.state(B) is State.HEALTHY


# --- re-admission: probes with backoff, rise, slow start, probation ---------------------

def test_quarantined_backend_is_probed_after_the_initial_backoff():
    h = make_engine()
    quarantine(h, A, 10.0)
    assert h.next_deadline() == pytest.approx(11.01)
    assert h.tick(11.0) == []
    actions = h.tick(11.01)
    assert transitions(actions) == [(A, State.QUARANTINED, State.PROBING)]
    assert only(actions, StartProbe) == [StartProbe(A, 1.0)]
    assert h.next_deadline() is None  # nothing to do until the probe answers


def test_failed_readmission_probe_doubles_the_interval():
    h = make_engine()
    quarantine(h, A, 0.0)
    now = 0.01
    waits = []
    for _ in range(4):
        due = h.next_deadline()
        waits.append(round(due - now, 6))
        h.tick(due)
        actions = probe(h, A, False, due)
        assert transitions(actions) == [(A, State.PROBING, State.QUARANTINED)]
        now = due
    assert waits == [1.0, 2.0, 4.0, 8.0]


def test_probe_interval_is_bounded_by_the_maximum():
    h = make_engine()
    quarantine(h, A, 0.0)
    now = 0.01
    waits = []
    for _ in range(9):
        due = h.next_deadline()
        waits.append(round(due - now, 6))
        h.tick(due)
        probe(h, A, False, due)
        now = due
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30, 30]


def test_rise_probe_successes_start_the_slow_start():
    h = make_engine()
    quarantine(h, A, 0.0)
    h.tick(1.01)
    actions = probe(h, A, True, 1.02, "connected")
    assert transitions(actions) == [(A, State.PROBING, State.QUARANTINED)]  # 1 of 2
    assert h.next_deadline() == pytest.approx(2.02)  # the next one after the initial interval
    h.tick(2.02)
    actions = probe(h, A, True, 2.03)
    assert transitions(actions) == [(A, State.PROBING, State.RAMPING)]
    assert only(actions, SetWeight) == [SetWeight(A, 1, "slow start begins")]  # 10 % of 10


def test_a_failed_probe_resets_the_rise_count():
    h = make_engine()
    quarantine(h, A, 0.0)
    h.tick(1.01)
    probe(h, A, True, 1.02)
    h.tick(2.02)
    probe(h, A, False, 2.03)
    h.tick(h.next_deadline())
    actions = probe(h, A, True, 10.0)
    assert h.state(A) is State.QUARANTINED and not only(actions, SetWeight)


def test_slow_start_ramps_the_weight_to_full_then_healthy():
    h = make_engine()
    quarantine(h, A, 0.0)
    readmit(h, A, 1.01)  # ramp starts at 2.03
    weights = [h.weights()[A]]
    final = []
    while h.state(A) is State.RAMPING:
        now = h.next_deadline()
        final = h.tick(now)
        weights.append(h.weights()[A])
    assert weights == [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert now == pytest.approx(12.03)
    assert transitions(final) == [(A, State.RAMPING, State.HEALTHY)]
    assert "probation" in only(final, Transition)[0].evidence


def test_slow_start_weight_is_at_least_one():
    h = make_engine(n=2, weights=[1, 1])
    quarantine(h, A, 0.0)
    readmit(h, A, 1.01)
    assert h.weights()[A] == 1


def test_zero_slow_start_readmits_at_full_weight_with_probation():
    h = make_engine(slow_start=0.0)
    quarantine(h, A, 0.0)
    actions = readmit(h, A, 1.01)
    assert transitions(actions) == [(A, State.PROBING, State.HEALTHY)]
    assert h.weights()[A] == 10
    actions = refuse(h, A, 5.0)
    assert transitions(actions) == [(A, State.HEALTHY, State.QUARANTINED)]


def test_failure_while_ramping_requarantines_at_once_and_doubles_the_backoff():
    h = make_engine()
    quarantine(h, A, 0.0)
    readmit(h, A, 1.01)
    actions = refuse(h, A, 4.0)
    assert transitions(actions) == [(A, State.RAMPING, State.QUARANTINED)]
    assert "failure in probation" in only(actions, Transition)[0].evidence
    assert only(actions, SetWeight)[0].weight == 0
    assert h.next_deadline() == pytest.approx(4.001 + 2.0)


def test_failure_in_probation_after_the_ramp_requarantines_at_once():
    h = make_engine()
    quarantine(h, A, 0.0)
    readmit(h, A, 1.01)  # ramp 2.03 .. 12.03, probation until 42.03
    h.tick(12.1)  # a late tick finishes the ramp at once
    assert h.state(A) is State.HEALTHY and h.weights()[A] == 10
    h.feed(UdpReplied(B, 30.0), 30.0)  # a usable peer
    actions = h.feed(UdpNoReply(A, 30.0), 30.0)  # any failure, soft ones included
    assert transitions(actions) == [(A, State.HEALTHY, State.QUARANTINED)]


def test_a_missed_deadline_while_ramping_is_probed_and_only_a_failed_probe_requarantines():
    # A missed deadline is an absence of evidence, which a skipped tracer run can fake: in
    # probation too the probe decides. Hard evidence still re-quarantines at once (above).
    h = make_engine()
    quarantine(h, A, 0.0)
    readmit(h, A, 1.01)  # ramp 2.03 .. 12.03
    build_history(h, A, 2.1)  # deadline trusted: the 200 ms floor
    h.feed(ConnectStarted(A, 920, 3.0), 3.0)
    actions = h.tick(3.2)
    assert transitions(actions) == []
    assert only(actions, StartProbe) == [StartProbe(A, pytest.approx(0.2))]
    assert probe(h, A, True, 3.3) == []
    assert h.state(A) is State.RAMPING
    h.feed(ConnectStarted(A, 921, 4.0), 4.0)
    h.tick(4.2)
    connect_ok(h, B, 4.21)  # a usable peer
    actions = probe(h, A, False, 4.3, "timed out")
    assert transitions(actions) == [(A, State.RAMPING, State.QUARANTINED)]
    assert h.next_deadline() == pytest.approx(4.3 + 2.0)  # a relapse: the backoff doubled


def test_a_missed_deadline_in_probation_after_the_ramp_makes_the_backend_suspect():
    h = make_engine()
    quarantine(h, A, 0.0)
    readmit(h, A, 1.01)
    h.tick(12.1)  # ramp done; probation until 42.03
    build_history(h, A, 13.0)
    h.feed(ConnectStarted(A, 922, 20.0), 20.0)
    actions = h.tick(20.2)
    assert transitions(actions) == [(A, State.HEALTHY, State.SUSPECT)]
    connect_ok(h, B, 20.25)  # a usable peer
    actions = probe(h, A, False, 20.3, "timed out")
    assert transitions(actions) == [(A, State.SUSPECT, State.QUARANTINED)]
    assert h.next_deadline() == pytest.approx(20.3 + 2.0)


def test_after_probation_one_failure_only_raises_suspicion():
    h = make_engine()
    quarantine(h, A, 0.0)
    readmit(h, A, 1.01)
    h.tick(12.1)
    h.tick(42.1)
    assert h.snapshot().backends[0].probation_until is None
    actions = refuse(h, A, 50.0)
    assert transitions(actions) == [(A, State.HEALTHY, State.SUSPECT)]


def test_failure_of_a_connect_started_before_readmission_does_not_count():
    h = make_engine(quarantine_weight=1)  # still some traffic while quarantined
    quarantine(h, A, 0.0)
    h.feed(ConnectStarted(A, 907, 1.5), 1.5)
    readmit(h, A, 1.01)
    assert h.feed(ResetInSynSent(A, 907, 2.5), 2.5) == []
    assert h.state(A) is State.RAMPING


def flap(h, backend, now):
    """Re-admit, then fail in probation. Returns (time, wait until the next probe)."""
    h.tick(now)
    probe(h, backend, True, now)
    now = h.next_deadline()
    h.tick(now)
    probe(h, backend, True, now)
    assert h.state(backend) is State.RAMPING
    refuse(h, backend, now + 1.0)
    assert h.state(backend) is State.QUARANTINED
    fail_time = now + 1.001
    return h.next_deadline(), round(h.next_deadline() - fail_time, 6)


def test_flapping_backend_backoff_grows_and_is_bounded():
    h = make_engine()
    quarantine(h, A, 0.0)
    now = h.next_deadline()
    waits = []
    for _ in range(8):
        now, wait = flap(h, A, now)
        waits.append(wait)
    assert waits == [2, 4, 8, 16, 30, 30, 30, 30]


def test_backoff_does_not_reset_on_silence():
    h = make_engine()
    quarantine(h, A, 0.0)
    now, wait = flap(h, A, h.next_deadline())
    assert wait == 2
    readmit_at = now
    h.tick(readmit_at)
    probe(h, A, True, readmit_at)
    h.tick(readmit_at + 1)
    probe(h, A, True, readmit_at + 1)
    h.tick(readmit_at + 11)  # ramp done
    h.tick(readmit_at + 41)  # probation done, without a single client connection
    assert h.snapshot().backends[0].probation_until is None
    assert h.snapshot().backends[0].backoff == 2
    connect_ok(h, A, readmit_at + 50)  # real traffic after probation
    assert h.snapshot().backends[0].backoff == 1


@pytest.mark.parametrize("timed", [True, False], ids=["established", "counted"])
def test_backoff_resets_when_probation_ends_after_real_successes(timed):
    h = make_engine()
    quarantine(h, A, 0.0)
    now, _ = flap(h, A, h.next_deadline())
    h.tick(now)
    probe(h, A, True, now)
    h.tick(now + 1)
    probe(h, A, True, now + 1)
    if timed:  # during the ramp
        connect_ok(h, A, now + 5)
    else:
        h.feed(Successes(A, 40, now + 5), now + 5)
    h.tick(now + 11)
    assert h.snapshot().backends[0].backoff == 2  # not before probation ends
    h.tick(now + 41)
    assert h.snapshot().backends[0].backoff == 1


def test_probe_jitter_spreads_probes_within_bounds():
    delays = []
    for seed in range(50):
        h = make_engine(seed=seed, probe_jitter=0.2)
        quarantine(h, A, 0.0)
        delays.append(h.next_deadline() - 0.01)
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert len({round(d, 6) for d in delays}) > 40


def test_jittered_delay_never_exceeds_the_maximum():
    h = make_engine(seed=3, probe_jitter=0.2)
    quarantine(h, A, 0.0)
    now = 0.01
    for _ in range(12):
        due = h.next_deadline()
        assert due - now <= 30.0 + 1e-9
        h.tick(due)
        probe(h, A, False, due)
        now = due


def test_same_seed_same_schedule():
    def schedule(seed):
        h = make_engine(seed=seed, probe_jitter=0.2)
        quarantine(h, A, 0.0)
        return h.next_deadline()
    assert schedule(1) == schedule(1) != schedule(2)


# --- guards -----------------------------------------------------------------------------

def test_last_usable_backend_is_never_quarantined():
    h = make_engine(n=1)
    refuse(h, A, 10.0)
    actions = probe(h, A, False, 10.1)
    assert only(actions, QuarantineWithheld) == [QuarantineWithheld(A, "last usable backend", "probe failed")]
    assert h.state(A) is State.SUSPECT and h.weights()[A] == 10
    # Still re-probed, with backoff, and withheld again without repeating the report.
    assert h.next_deadline() == pytest.approx(11.1)
    assert only(h.tick(11.1), StartProbe)
    assert probe(h, A, False, 11.2) == []
    assert h.next_deadline() == pytest.approx(13.2)


def test_last_usable_guard_counts_only_backends_in_rotation():
    h = make_engine(n=3, max_quarantined=5)
    quarantine(h, A, 0.0)
    quarantine(h, B, 10.0)
    refuse(h, C, 20.0)
    actions = probe(h, C, False, 20.1)
    assert only(actions, QuarantineWithheld)[0].guard == "last usable backend"
    assert h.weights()[C] == 10


def test_max_quarantined_setting_is_respected():
    h = make_engine(n=4, max_quarantined=1)
    quarantine(h, A, 0.0)
    actions = quarantine(h, B, 10.0)
    assert only(actions, QuarantineWithheld)[0].guard == "max_quarantined (1) already out"
    assert h.state(B) is State.SUSPECT


def test_withheld_backend_is_quarantined_once_the_guard_allows():
    h = make_engine(n=2)
    quarantine(h, A, 0.0)  # A's first re-admission probe is due at 1.01
    actions = quarantine(h, B, 0.5)
    assert only(actions, QuarantineWithheld)[0].guard == "last usable backend"
    h.tick(1.01)
    probe(h, A, True, 1.02)  # A: 1 of 2
    assert only(h.tick(1.51), StartProbe) == [StartProbe(B, 1.0)]  # B re-probed with backoff
    assert probe(h, B, False, 1.52) == []  # still withheld, reported once
    h.tick(2.02)
    probe(h, A, True, 2.03)
    assert h.state(A) is State.RAMPING  # A back in rotation
    assert only(h.tick(3.52), StartProbe) == [StartProbe(B, 1.0)]
    actions = refused(h, B, 3.6)
    assert transitions(actions) == [(B, State.SUSPECT, State.QUARANTINED)]


def test_weight_zero_backend_is_never_touched():
    h = make_engine(n=3, weights=[0, 10, 10])
    assert h.state(A) is State.DISABLED
    assert refuse(h, A, 1.0) == []
    assert probe(h, A, False, 1.1) == []
    assert h.weights()[A] == 0 and h.state(A) is State.DISABLED
    # It does not count as a backend: with B out, C is the last usable one.
    quarantine(h, B, 5.0)
    actions = quarantine(h, C, 15.0)
    assert only(actions, QuarantineWithheld)[0].guard == "last usable backend"


# --- UDP --------------------------------------------------------------------------------

def test_udp_unreachable_from_the_backend_is_a_hard_failure():
    h = make_engine(protocol="udp")
    actions = h.feed(UdpUnreachable(A, 5.0, "port unreachable"), 5.0)
    assert transitions(actions) == [(A, State.HEALTHY, State.SUSPECT)]
    assert h.snapshot().backends[0].counters.hard_failures == 1
    assert refused(h, A, 5.1) and h.state(A) is State.QUARANTINED


def test_udp_no_reply_is_a_soft_failure_and_replies_reset_the_streak():
    h = make_engine(protocol="udp")
    h.feed(UdpNoReply(A, 5.0), 5.0)
    h.feed(UdpNoReply(A, 6.0), 6.0)
    h.feed(UdpReplied(A, 6.5), 6.5)
    h.feed(UdpNoReply(A, 7.0), 7.0)
    assert h.state(A) is State.SUSPECT
    assert h.snapshot().backends[0].counters.soft_failures == 3
    h.feed(UdpNoReply(A, 8.0), 8.0)
    h.feed(UdpReplied(B, 9.0), 9.0)  # a silent failure goes out when a peer is usable now
    h.feed(UdpNoReply(A, 9.0), 9.0)
    assert h.state(A) is State.QUARANTINED


def test_unreachable_not_attributed_to_a_backend_is_not_evidence():
    # IPVS answers port-unreachable itself when no destination is usable; the daemon must
    # not attribute it to a backend. Anything not naming one of ours is ignored.
    h = make_engine(protocol="udp")
    assert h.feed(UdpUnreachable((VIP, 80), 5.0), 5.0) == []
    assert all(b.counters.hard_failures == 0 for b in h.snapshot().backends)


# --- reload -----------------------------------------------------------------------------

def test_reload_keeps_the_state_of_backends_that_stay():
    h = make_engine(n=3)
    quarantine(h, A, 0.0)
    refuse(h, B, 0.5)  # suspect, probe out
    svc = h.service
    new_backends = (svc.backends[0], svc.backends[1], Backend(key(3)[0], key(3)[1], 10))
    actions = h.update_service(Service(svc.name, svc.protocol, svc.vip, svc.port, new_backends,
                                       health=svc.health), 1.0)
    assert actions == []
    assert h.state(A) is State.QUARANTINED and h.state(B) is State.SUSPECT and h.state(D) is State.HEALTHY
    assert h.weights() == {A: 0, B: 10, D: 10}
    assert transitions(probe(h, B, True, 1.1)) == [(B, State.SUSPECT, State.HEALTHY)]
    assert probe(h, C, False, 1.2) == []  # removed: forgotten


def test_reload_weight_changes():
    h = make_engine(n=3)
    quarantine(h, A, 0.0)
    svc = h.service
    new_backends = (Backend(A[0], A[1], 20), Backend(B[0], B[1], 30), Backend(C[0], C[1], 0))
    actions = h.update_service(Service(svc.name, svc.protocol, svc.vip, svc.port, new_backends,
                                       health=svc.health), 1.0)
    assert only(actions, SetWeight) == [SetWeight(B, 30, "configured weight changed"),
                                        SetWeight(C, 0, "configured weight 0")]
    assert transitions(actions) == [(C, State.HEALTHY, State.DISABLED)]
    assert h.weights() == {A: 0, B: 30, C: 0}


def test_reload_releases_quarantines_the_guards_no_longer_allow():
    h = make_engine(n=4)
    quarantine(h, A, 0.0)
    quarantine(h, B, 10.0)
    svc = h.service
    capped = HealthSettings(probe_jitter=0.0, max_quarantined=1)
    actions = h.update_service(Service(svc.name, svc.protocol, svc.vip, svc.port, svc.backends[:3],
                                       health=capped), 20.0)  # D removed, an opt-in cap of 1
    assert transitions(actions) == [(B, State.QUARANTINED, State.SUSPECT)]  # the more recent one
    assert h.weights() == {A: 0, B: 10, C: 10}  # the opt-in cap of 1
    assert StartProbe(B, 1.0) in only(h.tick(20.0), StartProbe)


def test_reload_disabling_health_restores_configured_weights():
    h = make_engine(n=3)
    quarantine(h, A, 0.0)
    svc = h.service
    off = Service(svc.name, svc.protocol, svc.vip, svc.port, svc.backends,
                  health=HealthSettings(enabled=False))
    actions = h.update_service(off, 1.0)
    assert only(actions, SetWeight) == [SetWeight(A, 10, "health checking disabled")]
    assert refuse(h, B, 2.0) == [] and h.tick(100.0) == [] and h.next_deadline() is None


# --- restart ----------------------------------------------------------------------------

def test_restart_backend_found_at_zero_is_quarantined_and_probed_at_once():
    h = make_engine(n=3, now=100.0, initial_weights={A: 0, B: 10, C: 10})
    assert h.state(A) is State.QUARANTINED and h.weights() == {A: 0, B: 10, C: 10}
    assert h.next_deadline() == 100.0
    actions = h.tick(100.0)
    assert transitions(actions) == [(A, State.QUARANTINED, State.PROBING)]
    assert only(actions, StartProbe) == [StartProbe(A, 1.0)]


def test_restart_never_zeroes_healthy_backends():
    h = make_engine(n=3, now=100.0, initial_weights={A: 10, B: 10, C: 10})
    assert all(s is State.HEALTHY for s in (h.state(A), h.state(B), h.state(C)))
    assert h.next_deadline() is None


def test_restart_unknown_backend_starts_healthy():
    h = make_engine(n=2, now=100.0, initial_weights={A: 10})
    assert h.state(B) is State.HEALTHY and h.weights()[B] == 10


def test_restart_resumes_an_interrupted_slow_start():
    h = make_engine(n=3, now=100.0, initial_weights={A: 55, B: 100, C: 100}, weights=[100, 100, 100])
    assert h.state(A) is State.RAMPING and h.weights()[A] == 55
    snap = h.snapshot().backends[0]
    assert snap.probation_until == pytest.approx(100.0 + 5.0 + 30.0)  # half the ramp left
    h.tick(100.0)
    assert h.weights()[A] == 55
    h.tick(105.0)
    assert h.state(A) is State.HEALTHY and h.weights()[A] == 100


def test_restart_applies_the_guards_to_what_it_finds():
    h = make_engine(n=3, now=100.0, initial_weights={A: 0, B: 0, C: 0})
    assert h.weights() == {A: 0, B: 0, C: 10}  # never the last usable one; all probed at once
    assert [h.state(k) for k in (A, B, C)] == [State.QUARANTINED, State.QUARANTINED, State.SUSPECT]
    starts = only(h.tick(100.0), StartProbe)
    assert {s.backend for s in starts} == {A, B, C}


def test_restart_single_backend_found_at_zero_is_put_back():
    h = make_engine(n=1, now=100.0, initial_weights={A: 0})
    assert h.weights() == {A: 10} and h.state(A) is State.SUSPECT


# --- status, metrics, hygiene -----------------------------------------------------------

def test_snapshot_feeds_status_and_metrics():
    h = make_engine(n=3)
    quarantine(h, A, 0.0)
    doc = snapshots.snapshot([h.snapshot()], now=5.0)
    table = status.render(doc)
    assert "quarantined" in table and "0/10" in table and "probe failed" in table
    registry = metrics.registry_for(lambda: doc)
    value = registry.get_sample_value("ipvslb_backend_state",
                                      {"service": "web", "backend": "10.77.0.1:8080", "state": "quarantined"})
    assert value == 1.0
    assert h.snapshot().backends[0].transitions == {"healthy->suspect": 1, "suspect->quarantined": 1}


def test_every_transition_carries_its_evidence():
    h = make_engine(n=3)
    actions = refuse(h, A, 0.0)
    actions += refused(h, A, 0.01)
    actions += h.tick(1.01)
    actions += probe(h, A, True, 1.02)
    actions += h.tick(2.02)
    actions += probe(h, A, True, 2.03)
    while h.state(A) is State.RAMPING:
        actions += h.tick(h.next_deadline())
    found = only(actions, Transition)
    assert [t.new_state for t in found] == [State.SUSPECT, State.QUARANTINED, State.PROBING, State.QUARANTINED,
                                            State.PROBING, State.RAMPING, State.HEALTHY]
    assert all(t.evidence for t in found)


def test_idle_engine_needs_no_tick():
    h = make_engine()
    connect_ok(h, A, 1.0)
    assert h.next_deadline() is None


def test_pending_connects_are_forgotten_after_the_kernel_gives_up():
    h = make_engine()
    for i in range(100):
        h.feed(ConnectStarted(A, 10_000 + i, 1.0), 1.0)  # their closing records were lost
    h.tick(200.0)
    assert h._pending == {}


# --- end to end: round-robin traffic against a fake clock -------------------------------

def test_blackholed_backend_is_out_within_half_a_second():
    """50 connects/s round robin over 3 backends; at t=10 B starts dropping SYNs."""
    h = make_engine(n=3)
    backends = [A, B, C]
    out_at = None
    t, conn = 0.0, 50_000
    while t < 12.0 and out_at is None:
        conn += 1
        backend = backends[conn % 3]
        h.feed(ConnectStarted(backend, conn, t), t)
        if backend == B and t >= 10.0:
            pass  # no SYN-ACK, ever
        else:
            h.feed(Established(backend, conn, t + 0.002, 0.002), t + 0.002)
        for action in h.tick(t + 0.002):
            if isinstance(action, StartProbe):  # the direct probe times out as well
                actions = probe(h, action.backend, action.backend != B, t + action.timeout)
                if any(isinstance(a, SetWeight) and a.weight == 0 for a in actions):
                    out_at = t + action.timeout
        t += 0.02
    assert out_at is not None and out_at - 10.0 < 0.5
    assert h.weights() == {A: 10, B: 0, C: 10}
