"""Passive health: a pure, sans-I/O state machine per service (see engine.py).

Modules: types (evidence in, actions out), states (the states of a backend and the
transition table), backend (what is kept per backend), guards (what a confirmed failure
leads to), engine (`ServiceHealth`). The names below are the package's interface.
"""
from ipvslb.health.backend import CONNECT_HISTORY_SIZE, COUNTERS
from ipvslb.health.engine import (
    INITIAL_SYN_TIMEOUT,
    MAX_PENDING,
    PENDING_HORIZON,
    RAMP_STEP,
    UNTRUSTED_PROBE_TIMEOUT,
    ServiceHealth,
)
from ipvslb.health.guards import MAX_PEER_CHECKS, MIN_FREEZE_BACKENDS
from ipvslb.health.states import IN_ROTATION, OUT_OF_ROTATION, TRANSITIONS, Event, IllegalTransition, State
from ipvslb.health.types import (
    Action,
    CheckResult,
    ClosedInSynSent,
    ConnectStarted,
    Established,
    Evidence,
    FreezeLifted,
    FreezeReported,
    ProbeResult,
    QuarantineWithheld,
    ResetInSynSent,
    SetWeight,
    StartProbe,
    Successes,
    SynRetransmit,
    Transition,
    UdpNoReply,
    UdpReplied,
    UdpUnreachable,
    evidence_from,
)

__all__ = [
    "COUNTERS", "CONNECT_HISTORY_SIZE", "INITIAL_SYN_TIMEOUT", "IN_ROTATION", "MAX_PEER_CHECKS", "MAX_PENDING",
    "MIN_FREEZE_BACKENDS", "OUT_OF_ROTATION", "PENDING_HORIZON", "RAMP_STEP", "TRANSITIONS", "UNTRUSTED_PROBE_TIMEOUT",
    "Action", "CheckResult", "ClosedInSynSent", "ConnectStarted", "Established", "Event", "Evidence", "FreezeLifted",
    "FreezeReported", "IllegalTransition", "ProbeResult", "QuarantineWithheld", "ResetInSynSent", "ServiceHealth",
    "SetWeight", "StartProbe", "State", "Successes", "SynRetransmit", "Transition", "UdpNoReply", "UdpReplied",
    "UdpUnreachable", "evidence_from",
]
