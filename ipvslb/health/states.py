"""The states of one backend and every transition between them, as data.

In the spirit of h11's state machine: `TRANSITIONS` maps (state, event) to the next
state, and the engine moves a backend only through `next_state`, so this table is the
whole list of what can happen to a backend; anything else raises `IllegalTransition`.
What leads to an event (the evidence, the guards, the timers) is the engine's business.

    healthy --first failure--> suspect --probe fails / failure_threshold--> quarantined
       ^                          |                                          |  ^
       |<--------probe ok---------+                  backoff elapsed (tick)  v  | probe fails,
       |                                                                 probing  or ok < rise
       |<--slow start done-- ramping <------------- rise probes ok ------------+
       (probation: ramp + `probation` s; one failure -> quarantined, backoff x factor;
        a missed deadline is probed first, and a failed probe is that failure)

    disabled: configured weight 0 -- the engine never touches such a backend.

A backend's first state is not a transition: healthy or disabled from the configuration,
or, after a restart, quarantined or ramping from the weight found in the kernel.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType


class State(enum.StrEnum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    QUARANTINED = "quarantined"
    PROBING = "probing"
    RAMPING = "ramping"
    DISABLED = "disabled"


OUT_OF_ROTATION = frozenset({State.QUARANTINED, State.PROBING})
IN_ROTATION = frozenset({State.HEALTHY, State.SUSPECT, State.RAMPING})


class Event(enum.StrEnum):
    """What the engine decided happened to a backend (the evidence behind it travels in
    the Transition action)."""
    SUSPICION = "suspicion"              # failure evidence: the backend's probe decides
    WITHHELD = "quarantine withheld"     # a confirmed failure a guard keeps in rotation
    QUARANTINE = "quarantine"            # a confirmed failure the guards allow
    PROBE_OK = "probe ok"
    PROBE_FAILED = "probe failed"        # a re-admission probe (a confirmation probe's failure is a quarantine)
    PROBE_DUE = "probe due"              # the wait before a re-admission probe is over
    READMITTED = "readmitted"            # `rise` probes passed: slow start begins
    READMITTED_AT_FULL_WEIGHT = "readmitted at full weight"  # `rise` probes passed, slow_start 0
    RAMP_DONE = "slow start done"
    RELEASED = "released"                # back in rotation: a guard (reload, restart, freeze) wants it
    WEIGHT_ZERO = "configured weight 0"
    WEIGHT_RESTORED = "configured weight > 0"
    HEALTH_DISABLED = "health checking disabled"


_H, _S, _Q, _P, _R, _D = (State.HEALTHY, State.SUSPECT, State.QUARANTINED, State.PROBING, State.RAMPING,
                          State.DISABLED)

TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType({
    # In rotation: failure evidence.
    (_H, Event.SUSPICION): _S,
    (_S, Event.SUSPICION): _S,         # a missed deadline in probation: probed again
    (_H, Event.WITHHELD): _S,
    (_R, Event.WITHHELD): _S,          # at full weight: the guard says it cannot be spared
    (_H, Event.QUARANTINE): _Q,        # failure_threshold reached, or a failure in probation
    (_S, Event.QUARANTINE): _Q,        # the confirmation probe failed
    (_R, Event.QUARANTINE): _Q,        # a failure while ramping (in probation)
    (_S, Event.PROBE_OK): _H,
    # Out of rotation: re-admission.
    (_Q, Event.PROBE_DUE): _P,
    (_P, Event.PROBE_OK): _Q,          # fewer than `rise` in a row: wait probe_backoff_initial
    (_P, Event.PROBE_FAILED): _Q,      # wait longer (unless the failure was this host's)
    (_P, Event.READMITTED): _R,
    (_P, Event.READMITTED_AT_FULL_WEIGHT): _H,
    (_R, Event.RAMP_DONE): _H,
    (_Q, Event.RELEASED): _S,
    (_P, Event.RELEASED): _S,
    # Configuration.
    **{(s, Event.WEIGHT_ZERO): _D for s in (_H, _S, _Q, _P, _R)},
    (_D, Event.WEIGHT_RESTORED): _H,
    **{(s, Event.HEALTH_DISABLED): _H for s in (_S, _Q, _P, _R)},
})


class IllegalTransition(RuntimeError):
    """The engine asked for a transition the table does not have: a bug in the engine."""


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"no transition from {state} on {event}") from None
