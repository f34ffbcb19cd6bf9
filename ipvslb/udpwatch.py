"""UDP evidence from IPVS's per-destination packet counters (pure).

UDP has no handshake for the tracer to watch, but IPVS counts packets both ways for each
destination: requests going in with nothing coming back during a window is a soft failure,
anything coming back is a success. ICMP errors that IPVS itself generates (no usable
destination) never reach these counters, so they are never held against a backend.
"""
from __future__ import annotations

from collections.abc import Mapping

from ipvslb import health

# backend key -> (packets to the backend, packets from the backend), IPVS's cumulative counters
Counters = Mapping[health.BackendKey, tuple[int, int]]


def judge(previous: Counters, current: Counters, t: float) -> list[health.Evidence]:
    evidence: list[health.Evidence] = []
    for backend, (inpkts, outpkts) in current.items():
        if backend not in previous:
            continue  # first sight (or the counters were reset): no window to judge yet
        sent = inpkts - previous[backend][0]
        received = outpkts - previous[backend][1]
        if sent < 0 or received < 0:
            continue
        if received > 0:
            evidence.append(health.UdpReplied(backend, t))
        elif sent > 0:
            evidence.append(health.UdpNoReply(backend, t, f"{sent} packets sent, none came back"))
    return evidence
