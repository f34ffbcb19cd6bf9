"""What the engine keeps about one backend: its state, schedule, history and counters."""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ipvslb import model
from ipvslb.health.states import IN_ROTATION, State
from ipvslb.model import Endpoint

if TYPE_CHECKING:
    from ipvslb.health.guards import Confirmed

# Connect times kept per backend for the p99 ("recent").
CONNECT_HISTORY_SIZE = 200

COUNTERS = ("successes", "hard_failures", "soft_failures", "quarantines", "probes_ok", "probes_failed",
            "client_closes_in_syn_sent")


class ConnectHistory:
    """Recent connect times of one backend, with a cached p99."""

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=CONNECT_HISTORY_SIZE)
        self._p99: float | None = None

    def add(self, seconds: float) -> None:
        self._samples.append(max(0.0, seconds))
        self._p99 = None

    def __len__(self) -> int:
        return len(self._samples)

    def p99(self) -> float | None:
        if not self._samples:
            return None
        if self._p99 is None:
            ordered = sorted(self._samples)
            self._p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]
        return self._p99


@dataclass(eq=False)
class BackendHealth:
    """One backend as the engine sees it. `state` changes only through the transition table."""

    config: model.Backend
    state: State
    since: float
    weight: int
    backoff: float   # wait before the first probe after a quarantine
    interval: float  # current wait between probes (grows while probes fail)
    history: ConnectHistory = field(default_factory=ConnectHistory)
    streak: int = 0  # consecutive failures without a success
    last_failure_at: float | None = None  # when the latest failure of the kind a streak counts happened
    probe_outstanding: bool = False
    probe_timeout: float = 0.0
    # The slowest client connect that succeeded while the probe was out: proof of life
    # that outranks a probe which simply gave up too early.
    slow_success_during_probe: float = 0.0
    next_probe_at: float | None = None
    rises: int = 0
    ramp_start: float | None = None
    next_ramp_step: float | None = None
    readmitted_at: float | None = None
    probation_until: float | None = None
    successes_since_readmit: int = 0
    withheld: str | None = None
    last_evidence: str | None = None
    last_evidence_at: float | None = None
    last_success_at: float | None = None
    # For the guards' "usable now": the latest life (a success, or the start of a probe that
    # passed) and the latest failure of any kind (a local one too: a backend this host
    # cannot reach is not usable now), with whether that failure was a refusal.
    alive_at: float | None = None
    failed_at: float | None = None
    failed_answered: bool = False
    failing_since: float = 0.0  # start of the evidence the current suspicion is about
    probe_started_at: float | None = None
    peer_check: bool = False  # the outstanding probe asks about life for another's verdict
    awaiting: Confirmed | None = None  # a confirmed failure waiting for peer checks
    silent_out_at: float | None = None  # quarantined then on a silent failure (no answer)
    drained: bool = False  # an operator's drain: weight 0 in IPVS, never the usable peer
    counters: Counter = field(default_factory=lambda: Counter({name: 0 for name in COUNTERS}))
    transitions: Counter = field(default_factory=Counter)

    @property
    def key(self) -> Endpoint:
        return self.config.key

    @property
    def in_rotation(self) -> bool:
        return self.state in IN_ROTATION

    def clear_schedule(self) -> None:
        self.next_probe_at = None
        self.ramp_start = self.next_ramp_step = None

    def end_probation(self) -> None:
        self.readmitted_at = self.probation_until = None
        self.successes_since_readmit = 0
