"""Tracer records decoded into small immutable events (pure: bytes in, objects out).

The record layout is fixed by `struct record` in bpf/ipvslb.bpf.c.
"""
from __future__ import annotations

import enum
import ipaddress
import struct
from socket import AF_INET, AF_INET6
from typing import NamedTuple, Protocol

from ipvslb.model import PROTOCOL_NAMES, PROTOCOLS, Endpoint, IPAddress, format_endpoint

RECORD = struct.Struct("<QQQ16s16s16sHHHHBBBBB3x")
# A record as it sits in the BPF ring buffer: an 8-byte header (length, page offset) first.
RING_SLOT = struct.Struct("<8x" + RECORD.format.lstrip("<"))


class Kind(enum.IntEnum):
    CONNECT = 1
    BACKEND = 2
    ESTABLISHED = 3
    SYN_RETRANSMIT = 4
    RESET = 5
    CLOSED_SYN_SENT = 6
    CLOSED = 7
    # Established, but the kernel skipped the tracer at that transition (a tracing program
    # was already running on that CPU): seen later, when the connection left ESTABLISHED.
    # The connect succeeded; `elapsed` is the time until it was seen, only an upper bound
    # of the connect time, which health therefore does not use.
    ESTABLISHED_UNTIMED = 8
    # An ICMP (IPv4) or ICMPv6 destination unreachable that the backend of a UDP flow to a
    # VIP sent back (IPVS's own errors, with no backend, are never reported): `icmp_code`.
    UNREACHABLE = 9

    @property
    def label(self) -> str:
        return _LABELS[self]  # asked once per record by the daemon: computed once per kind


_LABELS = {kind: kind.name.lower().replace("_", "-") for kind in Kind}


class ConnEvent(NamedTuple):
    """One thing that happened to one connection to a managed VIP.

    `ts` is CLOCK_MONOTONIC in seconds (the kernel's bpf_ktime_get_ns, the same clock as
    Python's time.monotonic). `sock` identifies the client socket (0 when unknown: UDP).
    `elapsed` is the time since the connect started (established, retransmit, reset, close).

    A named tuple rather than a frozen dataclass: the daemon builds one per record, thousands
    per second on a busy host, and a tuple is built several times faster.
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
    icmp_code: int = 0

    def with_backend(self, backend: Endpoint | None) -> ConnEvent:
        return self._replace(backend=backend)

    def __str__(self) -> str:
        backend = format_endpoint(self.backend) if self.backend else "?"
        extra = ""
        if self.kind in (Kind.ESTABLISHED, Kind.RESET, Kind.SYN_RETRANSMIT, Kind.CLOSED_SYN_SENT):
            extra = f" after={self.elapsed * 1000:.1f}ms"
        elif self.kind is Kind.ESTABLISHED_UNTIMED:
            extra = f" seen-after={self.elapsed * 1000:.1f}ms"
        elif self.kind is Kind.UNREACHABLE:
            extra = f" icmp={unreachable_reason(self)}"
        if self.retransmits:
            extra += f" retransmits={self.retransmits}"
        return (f"{self.ts:.6f} {self.kind.label:<15} {self.protocol} {format_endpoint(self.client)} -> "
                f"{format_endpoint(self.vip)} via {backend}{extra}")


# Destination unreachable codes (RFC 792 and 1812; RFC 4443). Fragmentation needed (IPv4 code
# 4, path MTU discovery) is no failure and not reported.
ICMP_UNREACHABLE = {0: "net unreachable", 1: "host unreachable", 2: "protocol unreachable",
                    3: "port unreachable", 5: "source route failed", 6: "net unknown", 7: "host unknown",
                    9: "net prohibited", 10: "host prohibited", 11: "net unreachable for TOS",
                    12: "host unreachable for TOS", 13: "administratively prohibited"}
ICMPV6_UNREACHABLE = {0: "no route", 1: "administratively prohibited", 2: "beyond scope of source address",
                      3: "address unreachable", 4: "port unreachable", 5: "source address failed policy",
                      6: "reject route"}


def unreachable_reason(event: ConnEvent) -> str:
    """What an UNREACHABLE record's code says, e.g. "ICMP port unreachable"."""
    if event.backend is not None and event.backend[0].version == 6:
        return "ICMPv6 " + ICMPV6_UNREACHABLE.get(event.icmp_code, f"unreachable code {event.icmp_code}")
    return "ICMP " + ICMP_UNREACHABLE.get(event.icmp_code, f"unreachable code {event.icmp_code}")



class _Addresses(dict):
    """Raw 16-byte addresses of one family -> address objects. The same few VIPs, backends
    and client addresses repeat in every record; a hit is one C-level dict lookup."""

    def __init__(self, family: int):
        super().__init__()
        self.family = family

    def __missing__(self, raw: bytes) -> IPAddress:
        if len(self) >= 4096:
            self.clear()
        address = ipaddress.IPv4Address(raw[:4]) if self.family == AF_INET else ipaddress.IPv6Address(raw)
        self[raw] = address
        return address


# Indexed by address family (AF_INET 2, AF_INET6 10).
_ADDRESSES: list[_Addresses | None] = [None] * (AF_INET6 + 1)
_ADDRESSES[AF_INET], _ADDRESSES[AF_INET6] = _Addresses(AF_INET), _Addresses(AF_INET6)
_KINDS = {kind.value: kind for kind in Kind}


def _address(raw: bytes, family: int) -> IPAddress:
    return _ADDRESSES[AF_INET if family == AF_INET else AF_INET6][raw]  # type: ignore[index]


_new_tuple = tuple.__new__


def _event(ts: int, sock: int, elapsed_ns: int, caddr: bytes, vaddr: bytes, baddr: bytes, cport: int,
           vport: int, bport: int, retransmits: int, kind: int, family: int, protocol: int,
           bfamily: int, icmp_code: int) -> ConnEvent:
    """One record, every code checked: the path for records decode_slots' fast path refuses."""
    return ConnEvent(
        Kind(kind), ts / 1e9, sock, PROTOCOL_NAMES.get(protocol, str(protocol)),
        (_address(caddr, family), cport), (_address(vaddr, family), vport),
        (_address(baddr, bfamily), bport) if bfamily else None, retransmits, elapsed_ns / 1e9, icmp_code,
    )


def decode_slots(data: bytes) -> list[ConnEvent]:
    """Records as they sit in the ring buffer, each behind its 8-byte header.

    Called for thousands of records a second: one comprehension with no Python-level call
    per record. A record with an unknown kind, protocol or family falls back to _event."""
    addresses, kinds, protocols, new = _ADDRESSES, _KINDS, PROTOCOL_NAMES, _new_tuple
    try:
        return [new(ConnEvent, (kinds[kind], ts / 1e9, sock, protocols[protocol],
                                (addresses[family][caddr], cport), (addresses[family][vaddr], vport),
                                (addresses[bfamily][baddr], bport) if bfamily else None,
                                retransmits, elapsed_ns / 1e9, icmp_code))
                for (ts, sock, elapsed_ns, caddr, vaddr, baddr, cport, vport, bport, retransmits,
                     kind, family, protocol, bfamily, icmp_code) in RING_SLOT.iter_unpack(data)]
    except (KeyError, IndexError, TypeError):
        return [_event(*fields) for fields in RING_SLOT.iter_unpack(data)]


# struct pair, the `pair_slots` map's key, and struct pair_stats, a `pair_counts` element.
PAIR = struct.Struct("<16s16sHHBBBx")
PAIR_STATS = struct.Struct("<QQQ")


class Counted(NamedTuple):
    """Connects to one (VIP, backend) that established without records, as the kernel counts
    them: `connects` since the pair got its slot, the last at `ts` (monotonic seconds)."""

    protocol: str
    vip: Endpoint
    backend: Endpoint
    connects: int
    ts: float


def pair_key(protocol: str, vip: Endpoint, backend: Endpoint) -> bytes:
    """The `pair_slots` map key (struct pair) for one (VIP, backend)."""
    (vaddr, vport), (baddr, bport) = vip, backend
    return PAIR.pack(vaddr.packed.ljust(16, b"\0"), baddr.packed.ljust(16, b"\0"), vport, bport,
                     AF_INET if vaddr.version == 4 else AF_INET6,
                     AF_INET if baddr.version == 4 else AF_INET6,
                     PROTOCOLS[protocol])


def decode_pair(raw: bytes) -> tuple[str, Endpoint, Endpoint]:
    """A struct pair back into (protocol, VIP, backend)."""
    vaddr, baddr, vport, bport, family, bfamily, protocol = PAIR.unpack(raw)
    return (PROTOCOL_NAMES.get(protocol, str(protocol)), (_address(vaddr, family), vport),
            (_address(baddr, bfamily), bport))


# struct udp_stats, a `udp_counts` value: UDP packets to the backend, and back from it.
UDP_STATS = struct.Struct("<QQ")


class CountedSince:
    """The kernel's counts only grow; this remembers the last count per (VIP, backend) and
    returns what is new. A count below the last one means the pair was deleted and counts
    from zero again (its service was reloaded away and back)."""

    def __init__(self) -> None:
        self._last: dict[tuple, int] = {}

    def new(self, counted: list[Counted]) -> list[tuple[Counted, int]]:
        fresh = []
        for c in counted:
            pair = (c.protocol, c.vip, c.backend)
            last = self._last.get(pair, 0)
            if c.connects < last:
                last = 0
            if c.connects > last:
                fresh.append((c, c.connects - last))
            self._last[pair] = c.connects
        return fresh


class Traced(Protocol):
    """A service to trace, as Tracer.set_vips needs it: model.Service, or Vip."""

    @property
    def protocol(self) -> str: ...
    @property
    def vip(self) -> IPAddress: ...
    @property
    def port(self) -> int: ...


class Vip(NamedTuple):
    protocol: str
    vip: IPAddress
    port: int


# struct vip_key, the `vips` map's key.
VIP_KEY = struct.Struct("<16sHBB")


def vip_key(protocol: str, address: IPAddress, port: int) -> bytes:
    """The `vips` map key (struct vip_key) for one managed service."""
    proto = PROTOCOLS[protocol]
    family = AF_INET if address.version == 4 else AF_INET6
    return VIP_KEY.pack(address.packed.ljust(16, b"\0"), port, proto, family)
