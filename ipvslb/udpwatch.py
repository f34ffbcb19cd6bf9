"""UDP evidence from per-backend packet counts (pure: counters and times in).

UDP has no handshake for the tracer to watch, but packets to and from each backend can be
counted: by the tracer where IPVS rewrites them (current at every read), or else by IPVS's
per-destination counters. The daemon reads the counts `STEPS` times per `udp_reply_window`;
a backend that has been sent packets and sent none back for a whole window since is a soft
failure, anything coming back is a success. The window is measured from the first reading
that saw a packet go out unanswered.

IPVS refreshes the counters it reports only every `IPVS_REFRESH` seconds (its rate
estimator sums the per-CPU counters then): read from IPVS, a backend that stops replying is
judged 2-4 s later than from the tracer's counts. A lone request whose reply comes just
after a reading looks unanswered until the next one: that window's soft failure only makes
the backend suspect, and the probe clears it.

ICMP errors that IPVS itself generates (no usable destination) never reach these counts.
An ICMP error the backend sends is counted as a packet from it by IPVS, like a reply (not by
the tracer): the tracer reports it separately, as an unreachable (a hard failure).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ipvslb import health, model

# Readings per reply window: a silent backend is judged at most window / STEPS late.
STEPS = 4
# Seconds between IPVS's refreshes of the counters it reports (ip_vs_est.c: every 2 s).
IPVS_REFRESH = 2.0

# backend key -> (packets to the backend, packets from the backend), IPVS's cumulative counters
Counters = Mapping[model.Endpoint, tuple[int, int]]


@dataclass
class _Backend:
    sent: int
    received: int
    # When a reading first saw packets go out with nothing back since; None while answered.
    unanswered_since: float | None = None
    unanswered: int = 0


class ReplyWatch:
    """The counters of one UDP service, read every `window / STEPS` seconds."""

    def __init__(self, window: float):
        self.window = window
        self._backends: dict[model.Endpoint, _Backend] = {}

    @property
    def interval(self) -> float:
        return self.window / STEPS

    def judge(self, current: Counters, t: float) -> list[health.Evidence]:
        evidence: list[health.Evidence] = []
        known = self._backends
        self._backends = {}
        for backend, (sent, received) in current.items():
            b = known.get(backend)
            self._backends[backend] = now = _Backend(sent, received)
            if b is None or sent < b.sent or received < b.received:
                continue  # first sight, or the counters were reset: nothing to compare yet
            if received > b.received:
                # A reply may answer a request sent in this same step: nothing is pending.
                evidence.append(health.UdpReplied(backend, t))
                continue
            now.unanswered_since, now.unanswered = b.unanswered_since, b.unanswered + sent - b.sent
            if now.unanswered_since is None and sent > b.sent:
                now.unanswered_since = t  # sent at the latest now: the window starts here
            if now.unanswered_since is not None and t - now.unanswered_since >= self.window - 1e-9:
                evidence.append(health.UdpNoReply(
                    backend, t, f"{now.unanswered} packets sent, none came back"))
                # One failure per window of silence, the next window from here.
                now.unanswered_since, now.unanswered = (t, 0) if sent > b.sent else (None, 0)
        return evidence
