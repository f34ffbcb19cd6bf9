"""What a UDP probe sends and which reply passes it (pure: bytes in, verdicts out).

A UDP service says nothing about itself unless asked in its own protocol, so a probe sends
a real request and needs a real answer: a DNS query to a service on port 53, the configured
`udp_probe_payload` to any other (`health` section, docs/configuration.md).
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ipvslb.model import Service

DNS_PORT = 53
# Sent to a UDP service on another port when it has no `udp_probe_payload`.
DEFAULT_PAYLOAD = b"\n"
_HEADER = struct.Struct("!HHHHHH")  # id, flags, question, answer, authority, additional counts
_FLAG_RD, _FLAG_QR = 0x0100, 0x8000
_TYPE_NS, _CLASS_IN = 2, 1
_SERVFAIL = 2


@dataclass(frozen=True)
class UdpRequest:
    payload: bytes
    # The reply -> None when it passes the probe, else why not.
    judge: Callable[[bytes], str | None]
    what: str  # for the probe's detail: "DNS reply", "reply"


def dns_query(name: str, ident: int, qtype: int = _TYPE_NS) -> bytes:
    """A standard query, recursion desired, for the `qtype` (default NS) records of `name`
    ("." is the root)."""
    labels = [label for label in name.rstrip(".").split(".") if label]
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels) + b"\0"
    return _HEADER.pack(ident, _FLAG_RD, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, _CLASS_IN)


def dns_rcode(ident: int, reply: bytes) -> int | str:
    """The response code of a reply to our query, or why `reply` is not one."""
    if len(reply) < _HEADER.size:
        return f"not a DNS reply ({len(reply)} bytes)"
    got, flags = _HEADER.unpack_from(reply)[:2]
    if got != ident or not flags & _FLAG_QR:
        return "not a reply to the probe's DNS query"
    return flags & 0xF


def dns_verdict(ident: int, reply: bytes) -> str | None:
    """A reply to our query passes unless it is SERVFAIL (the server could not answer): an
    authoritative server REFUSED to answer for a zone it does not serve is still serving."""
    rcode = dns_rcode(ident, reply)
    if isinstance(rcode, str):
        return rcode
    return "DNS SERVFAIL" if rcode == _SERVFAIL else None


def payload_verdict(expect: bytes | None) -> Callable[[bytes], str | None]:
    def judge(reply: bytes) -> str | None:
        if expect is None or expect in reply:
            return None
        return f"reply without the expected {expect!r}: {reply[:40]!r}"
    return judge


def for_service(service: Service, ident: int) -> UdpRequest:
    """The request a probe of one of this service's backends sends; `ident` is a random
    16-bit number (the DNS query id)."""
    h = service.health
    if h.udp_probe_payload is None and service.port == DNS_PORT:
        return UdpRequest(dns_query(h.dns_probe_name, ident), lambda reply: dns_verdict(ident, reply),
                          f"DNS reply for {h.dns_probe_name} NS")
    payload = DEFAULT_PAYLOAD if h.udp_probe_payload is None else h.udp_probe_payload.encode("latin-1")
    expect = None if h.udp_probe_expect is None else h.udp_probe_expect.encode("latin-1")
    return UdpRequest(payload, payload_verdict(expect), "reply")
