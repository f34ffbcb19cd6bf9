"""The IPVS sysctls a client-side balancer needs, written through /proc/sys.

net.ipv4.vs.conntrack = 1
    Connections this host originates are masqueraded by IPVS on the way out; without
    netfilter connection tracking for them the backend's replies do not find their way
    back to the socket (kube-proxy sets it for the same reason).
net.ipv4.vs.expire_nodest_conn = 1
    When a backend is deleted, its existing connection entries are dropped on their next
    packet instead of being kept until they time out. Without it a UDP flow (DNS,
    syslog) keeps being sent to a removed backend for as long as it stays busy.
net.ipv4.vs.expire_quiescent_template = 1
    With persistence, a client's template pins it to a backend even after that backend's
    weight drops to 0 (quarantine); expiring the template lets the next connection be
    scheduled to a healthy backend.
net.ipv4.vs.conn_reuse_mode = auto
    Before Linux 5.9, mode 1 delays a connection that reuses a source port of a
    still-tracked one by about a second, and mode 0 sends such a connection to the old
    (possibly removed) backend; 5.9 fixed mode 1. "auto" picks 0 before 5.9 and 1 from
    5.9 on, as kube-proxy does.

The values are per network namespace and exist once the ip_vs module is loaded.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ipvslb.model import Sysctls

PROC = Path("/proc/sys/net/ipv4/vs")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    if match is None:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return int(match[1]), int(match[2])


def desired(settings: Sysctls, release: str | None = None) -> dict[str, int]:
    reuse = settings.conn_reuse_mode
    if reuse == "auto":
        reuse = 1 if kernel_version(release) >= (5, 9) else 0
    return {
        "conntrack": int(settings.conntrack),
        "expire_nodest_conn": int(settings.expire_nodest_conn),
        "expire_quiescent_template": int(settings.expire_quiescent_template),
        "conn_reuse_mode": int(reuse),
    }


def apply(settings: Sysctls, root: Path = PROC, release: str | None = None) -> dict[str, int]:
    """Write the values that differ; return the ones written."""
    changed = {}
    for name, value in desired(settings, release).items():
        path = root / name
        if int(path.read_text()) != value:
            path.write_text(f"{value}\n")
            changed[name] = value
    return changed
