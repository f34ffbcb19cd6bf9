"""Tracer records decoded into small immutable events (pure: bytes in, objects out).

The record layout is fixed by `struct record` in bpf/ipvslb.bpf.c.
"""
from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from dataclasses import dataclass

from ipvslb.model import IPAddress

RECORD = struct.Struct("<QQQ16s16s16sHHHHBBBBI")
AF_INET, AF_INET6 = 2, 10
PROTOCOLS = {6: "tcp", 17: "udp"}


class Kind(enum.IntEnum):
    CONNECT = 1
    BACKEND = 2
    ESTABLISHED = 3
    SYN_RETRANSMIT = 4
    RESET = 5
    CLOSED_SYN_SENT = 6
    CLOSED = 7

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


Endpoint = tuple[IPAddress, int]


@dataclass(frozen=True, slots=True)
class ConnEvent:
    """One thing that happened to one connection to a managed VIP.

    `ts` is CLOCK_MONOTONIC in seconds (the kernel's bpf_ktime_get_ns, the same clock as
    Python's time.monotonic). `sock` identifies the client socket (0 when unknown: UDP).
    `elapsed` is the time since the connect started (established, retransmit, reset, close).
    """

    kind: Kind
    ts: float
    sock: int
    protocol: str
    client: Endpoint
    vip: Endpoint
    backend: Endpoint | None
    retransmits: int = 0
    elapsed: float = 0.0

    def with_backend(self, backend: Endpoint | None) -> "ConnEvent":
        return ConnEvent(self.kind, self.ts, self.sock, self.protocol, self.client, self.vip, backend,
                         self.retransmits, self.elapsed)

    def __str__(self) -> str:
        backend = format_endpoint(self.backend) if self.backend else "?"
        extra = ""
        if self.kind in (Kind.ESTABLISHED, Kind.RESET, Kind.SYN_RETRANSMIT, Kind.CLOSED_SYN_SENT):
            extra = f" after={self.elapsed * 1000:.1f}ms"
        if self.retransmits:
            extra += f" retransmits={self.retransmits}"
        return (f"{self.ts:.6f} {self.kind.label:<15} {self.protocol} {format_endpoint(self.client)} -> "
                f"{format_endpoint(self.vip)} via {backend}{extra}")


def format_endpoint(endpoint: Endpoint) -> str:
    addr, port = endpoint
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


@functools.lru_cache(maxsize=4096)
def _address(raw: bytes, family: int) -> IPAddress:
    # Cached: the same few VIPs, backends and client addresses repeat in every record.
    return ipaddress.IPv4Address(raw[:4]) if family == AF_INET else ipaddress.IPv6Address(raw)


def decode(data: bytes) -> ConnEvent:
    (ts, sock, elapsed_ns, caddr, vaddr, baddr, cport, vport, bport, retransmits,
     kind, family, protocol, bfamily, _pad) = RECORD.unpack_from(data)
    backend = (_address(baddr, bfamily), bport) if bfamily else None
    return ConnEvent(
        kind=Kind(kind), ts=ts / 1e9, sock=sock, protocol=PROTOCOLS.get(protocol, str(protocol)),
        client=(_address(caddr, family), cport), vip=(_address(vaddr, family), vport),
        backend=backend, retransmits=retransmits, elapsed=elapsed_ns / 1e9,
    )


def vip_key(protocol: str, address: IPAddress, port: int) -> bytes:
    """The `vips` map key (struct vip_key) for one managed service."""
    proto = {"tcp": 6, "udp": 17}[protocol]
    family = AF_INET if address.version == 4 else AF_INET6
    return struct.pack("<16sHBB", address.packed.ljust(16, b"\0"), port, proto, family)
