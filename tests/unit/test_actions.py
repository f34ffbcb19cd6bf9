"""The executor of health's actions, with fakes for IPVS, conntrack and the prober: weight
writes that fail are logged and carried past, a probe answered at once is fed back in the
same call, a probe that cannot start is one failed probe, weight 0 frees stuck connects,
and log lines come after the weights."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging

import pytest

from ipvslb import actions, health, notify, probe
from ipvslb.model import Backend, Service

VIP = ipaddress.ip_address("10.90.0.1")
A = (ipaddress.ip_address("10.77.0.1"), 80)
B = (ipaddress.ip_address("10.77.0.2"), 80)
REFUSED = probe.ProbeOutcome(False, "ECONNREFUSED (Connection refused)", 0.001, refused=True)


def service(protocol="tcp") -> Service:
    return Service("web", protocol, VIP, 80, (Backend(*A), Backend(*B)))


class Engine:
    """Stands in for health.ServiceHealth: records what it is fed and answers with
    `respond(evidence)`."""

    def __init__(self, respond=lambda evidence: [], protocol="tcp"):
        self.service = service(protocol)
        self.fed: list = []
        self.respond = respond

    def feed(self, evidence, now):
        self.fed.append(evidence)
        return self.respond(evidence)


class Manager:
    def __init__(self, events: list, failing: set | None = None):
        self.events, self.failing = events, failing or set()

    def set_weight(self, service, backend, weight):
        if backend in self.failing:
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        self.events.append(("weight", backend, weight))


class Rescuer:
    def __init__(self, events: list):
        self.events = events

    def rescue(self, protocol, vip, backend):
        self.events.append(("rescue", protocol, vip, backend))
        return []


class Started:
    """A TcpProbe whose answer came before connect() returned."""

    def __init__(self, outcome):
        self.outcome, self.closed = outcome, False

    def close(self):
        self.closed = True


class Prober:
    def __init__(self, outcome=None, error=None):
        self.outcome, self.error, self.started = outcome, error, []

    def TcpProbe(self, address, port):
        if self.error is not None:
            raise self.error
        self.started.append(Started(self.outcome))
        return self.started[-1]


class Recorder(logging.Handler):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def emit(self, record):
        self.events.append(("log", record.levelno, record.getMessage()))


@pytest.fixture
def events():
    events: list = []
    handler = Recorder(events)
    logger = logging.getLogger("ipvslb")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield events
    logger.removeHandler(handler)
    logger.setLevel(level)


def executor(events, prober=None, failing=None, **kw) -> actions.Executor:
    return actions.Executor(Manager(events, failing), Rescuer(events), prober or Prober(), clock=lambda: 5.0, **kw)


def logs(events) -> list[str]:
    return [e[2] for e in events if e[0] == "log"]


def test_a_weight_the_kernel_refuses_is_logged_and_the_other_weights_still_go_out(events):
    ex = executor(events, failing={A})
    ex.act(Engine(), [health.SetWeight(A, 0, "refused"), health.SetWeight(B, 5, "ramp")])
    assert [e for e in events if e[0] == "weight"] == [("weight", B, 5)]
    assert ("log", logging.ERROR, "web 10.77.0.1:80: cannot set weight 0: [Errno 110] Connection timed out") in events
    assert "web 10.77.0.2:80: weight 5 (ramp)" in logs(events)
    # Only a write that happened is in the history status shows, and a failed weight 0
    # frees nothing.
    assert {k: list(v) for k, v in ex.weight_history.items()} == {(service().key, B): [(5.0, 5)]}
    assert not any(e[0] == "rescue" for e in events)


def test_weight_0_frees_the_stuck_connects_and_no_other_weight_does(events):
    executor(events).act(Engine(), [health.SetWeight(A, 0, "refused"), health.SetWeight(B, 3, "ramp")])
    assert [e for e in events if e[0] != "log"] == [("weight", A, 0), ("rescue", "tcp", (VIP, 80), A),
                                                     ("weight", B, 3)]


def test_a_refusal_before_connect_returned_is_answered_and_acted_on_in_the_same_call(events):
    prober = Prober(REFUSED)
    engine = Engine(lambda ev: [health.SetWeight(ev.backend, 0, "probe refused")]
                    if isinstance(ev, health.ProbeResult) else [])
    executor(events, prober).act(engine, [health.StartProbe(A, 1.0), health.SetWeight(B, 2, "ramp")])
    assert engine.fed == [health.ProbeResult(A, False, 5.0, REFUSED.detail, local=False, refused=True)]
    # After the batch's other action, which the engine decided before the answer.
    assert [e for e in events if e[0] == "weight"] == [("weight", B, 2), ("weight", A, 0)]
    assert prober.started[0].closed


def test_a_probe_without_a_socket_is_one_failed_probe_on_this_host(events):
    engine = Engine()
    executor(events, Prober(error=OSError(errno.EMFILE, "Too many open files"))).act(
        engine, [health.StartProbe(A, 1.0)])
    assert len(engine.fed) == 1
    result = engine.fed[0]
    assert isinstance(result, health.ProbeResult) and result.backend == A
    assert not result.ok and result.local and not result.refused
    assert "Too many open files" in result.detail


def test_answers_are_fed_depth_first_without_recursion(events):
    """Each answer's own consequences are carried out before the next answer is fed, and
    a chain longer than Python's recursion limit allows takes no stack."""
    depth = {A: 0}

    def respond(ev):
        if ev.backend == A and depth[A] < 1500:
            depth[A] += 1
            return [health.StartProbe(A, 1.0)]
        return [health.SetWeight(ev.backend, 1, "answered")]
    engine = Engine(respond)
    ex = executor(events, Prober(REFUSED))
    actions.MAX_ANSWERS, saved = 2000, actions.MAX_ANSWERS
    try:
        ex.act(engine, [health.StartProbe(A, 1.0), health.StartProbe(B, 1.0)])
    finally:
        actions.MAX_ANSWERS = saved
    assert [ev.backend for ev in engine.fed] == [A] * 1501 + [B]
    assert [e for e in events if e[0] == "weight"] == [("weight", A, 1), ("weight", B, 1)]


def test_an_engine_that_keeps_asking_for_answered_probes_is_stopped(events):
    engine = Engine(lambda ev: [health.SetWeight(B, 0, "x"), health.StartProbe(A, 1.0)])
    with pytest.raises(RuntimeError, match="more than 1000 probes answered at once"):
        executor(events, Prober(REFUSED)).act(engine, [health.StartProbe(A, 1.0)])
    assert len(engine.fed) == actions.MAX_ANSWERS
    assert len(logs(events)) == actions.MAX_ANSWERS   # every weight written is still logged


def test_log_lines_come_after_every_weight_of_the_call(events):
    engine = Engine(lambda ev: [health.SetWeight(ev.backend, 0, "probe refused"),
                                health.Transition(ev.backend, health.State.SUSPECT, health.State.QUARANTINED,
                                                  "probe refused")])
    executor(events, Prober(REFUSED)).act(engine, [health.SetWeight(B, 2, "ramp"), health.StartProbe(A, 1.0)])
    kinds = [e[0] for e in events]
    assert kinds == ["weight", "weight", "rescue", "log", "log", "log"]
    assert logs(events) == ["web 10.77.0.2:80: weight 2 (ramp)", "web 10.77.0.1:80: weight 0 (probe refused)",
                            "web 10.77.0.1:80: suspect -> quarantined: probe refused"]


def test_on_a_loop_the_log_lines_wait_for_the_next_loop_turn(events):
    async def main():
        executor(events).act(Engine(), [health.SetWeight(A, 4, "ramp")])
        assert [e[0] for e in events] == ["weight"]
        await asyncio.sleep(0)
        assert logs(events) == ["web 10.77.0.1:80: weight 4 (ramp)"]
    asyncio.run(main())


class Pending:
    """A TcpProbe still waiting for its answer."""
    outcome = None

    def __init__(self, answer):
        self.answer = answer

    async def result(self, timeout):
        return self.answer


def test_a_probe_answered_later_is_fed_from_its_task_and_the_tick_rescheduled(events):
    engine = Engine(lambda ev: [health.SetWeight(ev.backend, 7, "probe ok")])
    ticks = []
    prober = Prober()
    prober.TcpProbe = lambda address, port: Pending(probe.ProbeOutcome(True, "connected", 0.002))

    async def main():
        ex = executor(events, prober, after_probe=lambda: ticks.append(1))
        ex.act(engine, [health.StartProbe(A, 1.0)])
        assert engine.fed == [] and len(ex.probes) == 1
        await asyncio.gather(*ex.probes)
    asyncio.run(main())
    assert engine.fed == [health.ProbeResult(A, True, 5.0, "connected")]
    assert ("weight", A, 7) in events and ticks == [1]


def test_a_probe_of_a_service_reloaded_away_is_not_fed(events):
    engine = Engine()
    prober = Prober()
    prober.TcpProbe = lambda address, port: Pending(probe.ProbeOutcome(True, "connected", 0.002))

    async def main():
        ex = executor(events, prober, current=lambda svc: False)
        ex.act(engine, [health.StartProbe(A, 1.0)])
        await asyncio.gather(*ex.probes)
    asyncio.run(main())
    assert engine.fed == []


def test_a_udp_probe_that_raises_is_one_local_failure_and_counted(events):
    errors = []

    class Broken:
        async def probe(self, *args):
            raise OSError(errno.EMFILE, "Too many open files")
    engine = Engine(protocol="udp")

    async def main():
        ex = executor(events, Broken(), internal_error=lambda task, err: errors.append(task))
        ex.act(engine, [health.StartProbe(A, 1.0)])
        await asyncio.gather(*ex.probes)
    asyncio.run(main())
    assert errors == ["probe"]
    assert len(engine.fed) == 1 and not engine.fed[0].ok and engine.fed[0].local


class Notifier:
    def __init__(self, events: list):
        self.events = events

    def transition(self, note):
        self.events.append(("notify", note))


def test_a_transition_is_logged_with_its_journal_fields_then_told_to_the_notifier(events):
    records = []
    catcher = logging.Handler()
    catcher.emit = records.append
    logging.getLogger("ipvslb").addHandler(catcher)
    change = health.Transition(A, health.State.SUSPECT, health.State.QUARANTINED, "refused twice")

    async def main():
        ex = executor(events, notifier=Notifier(events))
        ex.act(Engine(), [change, health.SetWeight(A, 0, "quarantined")])
        assert [e[0] for e in events] == ["weight", "rescue"]   # hooks and lines wait for the weights
        await asyncio.sleep(0)
    try:
        asyncio.run(main())
    finally:
        logging.getLogger("ipvslb").removeHandler(catcher)
    note = notify.TransitionNote("web", "10.77.0.1:80", "suspect", "quarantined", "refused twice")
    assert [e[0] for e in events] == ["weight", "rescue", "log", "log", "notify"]
    assert events[-1] == ("notify", note)
    (line,) = [r for r in records if "->" in r.getMessage()]
    assert line.getMessage() == "web 10.77.0.1:80: suspect -> quarantined: refused twice"
    assert {k: getattr(line, k) for k in ("IPVSLB_SERVICE", "IPVSLB_BACKEND", "IPVSLB_STATE", "IPVSLB_EVIDENCE")} == {
        "IPVSLB_SERVICE": "web", "IPVSLB_BACKEND": "10.77.0.1:80", "IPVSLB_STATE": "quarantined",
        "IPVSLB_EVIDENCE": "refused twice"}


def test_without_a_loop_a_transition_is_logged_and_no_hook_is_started(events):
    change = health.Transition(A, health.State.HEALTHY, health.State.SUSPECT, "reset")
    executor(events, notifier=Notifier(events)).act(Engine(), [change])
    assert [e[0] for e in events] == ["log"]
