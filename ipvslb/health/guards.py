"""The guards: what a confirmed failure of a backend leads to, decided in one place.

A refusal proves this host's path to the backend works and that the backend serves no
one: it goes out while another backend is in rotation. A silent failure (no answer) goes
out when a peer is usable now; with none known, peer checks decide. If every backend then
failed silently together, or a probe failed on this host, the evidence points at this
host: quarantines freeze. Never the last backend in rotation (a drained one does not count); never beyond
`max_quarantined` when set. Pure functions of the backends' records.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ipvslb.health.backend import BackendHealth
from ipvslb.health.states import OUT_OF_ROTATION
from ipvslb.model import format_endpoint

# Peer checks a service may have out at once: enough to find a usable peer among the
# first few, few enough that one failure never turns into a burst of probes.
MAX_PEER_CHECKS = 3
# "Probes to every backend failing together" needs at least this many backends in
# rotation; with one, the last-usable guard decides alone.
MIN_FREEZE_BACKENDS = 2


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A failure that calls for a quarantine, on its way to a verdict."""
    evidence: str
    since: float      # when the failing evidence began: a usable peer shows life after it
    relapse: bool     # in probation: the backoff grows
    answered: bool    # a refusal: this host's path to the backend works
    local: bool = False  # the probe failed on this host: never a quarantine


class Verdict(enum.Enum):
    QUARANTINE = "quarantine"
    WAIT = "wait for peer checks"
    WITHHOLD = "withhold"
    FREEZE = "freeze"


def usable_now(o: BackendHealth, since: float) -> bool:
    """In rotation and alive at or after `since`, with no failure after that life."""
    return (o.in_rotation and o.alive_at is not None and o.alive_at >= since
            and (o.failed_at is None or o.failed_at <= o.alive_at))


def unchecked(o: BackendHealth, since: float) -> bool:
    """No probe out, and none started since `since`: a peer check could tell more."""
    return not o.probe_outstanding and (o.probe_started_at is None or o.probe_started_at < since)


def out_together(b: BackendHealth, since: float, eligible: Sequence[BackendHealth]) -> list[BackendHealth]:
    """Backends taken out on a silent failure since `b`'s failing evidence began: if
    that turns out to be this host's failure, they went out for it too."""
    return [o for o in eligible if o is not b and o.state in OUT_OF_ROTATION
            and o.silent_out_at is not None and o.silent_out_at >= since]


def verdict(b: BackendHealth, c: Confirmed, eligible: Sequence[BackendHealth], frozen: bool,
            max_quarantined: int | None) -> tuple[Verdict, str]:
    """What the confirmed failure `c` of `b` leads to, and why (the guard that said no, or
    the freeze's reason). `eligible`: the service's backends with a configured weight."""
    # A drained peer gets no new connects (weight 0 in IPVS): it serves no one new.
    peers = [o for o in eligible if o is not b and o.in_rotation and not o.drained]
    if frozen:
        return Verdict.WITHHOLD, "quarantines frozen"
    usable = not c.answered and any(usable_now(o, c.since) for o in peers)
    if not c.answered and not usable:
        if any(o.probe_outstanding or unchecked(o, c.since) for o in peers):
            return Verdict.WAIT, ""
        together = len(peers) + len(out_together(b, c.since, eligible)) + 1
        silent = b.alive_at is None or b.alive_at < c.since  # no client got through meanwhile
        if together >= MIN_FREEZE_BACKENDS and silent and not any(o.failed_answered for o in peers):
            if c.local:
                return Verdict.FREEZE, f"{format_endpoint(b.key)}: {c.evidence} on this host, " \
                                       "and no backend is usable"
            return Verdict.FREEZE, f"probes to all {together} backends went unanswered together"
    if not peers:
        return Verdict.WITHHOLD, "last usable backend"
    cap = max_quarantined
    if cap is not None and sum(o.state in OUT_OF_ROTATION for o in eligible) >= cap:
        return Verdict.WITHHOLD, f"max_quarantined ({cap}) already out"
    if c.local:  # others serve or refuse, so this host has a path: this is about this backend's route
        return Verdict.WITHHOLD, "no path from this host"
    return Verdict.QUARANTINE, ""  # a refusal, a usable peer, or the others refuse too
