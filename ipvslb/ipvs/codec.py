"""Packing and unpacking of IPVS service and destination messages with `struct`.

These are the messages that come by the thousand: a full load writes one per service and
destination, and every apply reads every destination back. pyroute2's generic encoder
costs about 1.4 ms per message in the test VM (ipvsadm restores a whole table of 11 000
rules in 4.4 s), so this module packs and unpacks the bytes itself. The layout follows
`messages`, from which it takes every attribute number; tests/unit/test_ipvs_codec.py
checks both directions against pyroute2's reading of the same schema.

Replies are checked as they are read: a length that runs past its container, an attribute
shorter than its header or its value, a required attribute missing: `MalformedReply`, never
a loop or a value read from the neighbouring bytes (the fuzz test feeds random bytes).
"""
from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from ipvslb.ipvs import messages
from ipvslb.ipvs.specs import (
    AF_INET,
    CONN_F_FWD_MASK,
    SVC_F_MANAGED,
    DestSpec,
    KernelDest,
    KernelService,
    ServiceSpec,
    Stats,
)
from ipvslb.model import PROTOCOL_NAMES, PROTOCOLS

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

_CMD = messages.attr_numbers(messages.ipvsmsg.nla_map)
_SVC = messages.attr_numbers(messages.ipvsmsg.service.nla_map)
_DEST = messages.attr_numbers(messages.ipvsmsg.dest.nla_map)
_STATS = messages.attr_numbers(messages.STATS_MAP)

CMD_ATTR_SERVICE = _CMD["IPVS_CMD_ATTR_SERVICE"]
CMD_ATTR_DEST = _CMD["IPVS_CMD_ATTR_DEST"]
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK = (
    _SVC[f"IPVS_SVC_ATTR_{n}"] for n in ("AF", "PROTOCOL", "ADDR", "PORT", "FWMARK"))
SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK, SVC_STATS, SVC_STATS64 = (
    _SVC[f"IPVS_SVC_ATTR_{n}"] for n in ("SCHED_NAME", "FLAGS", "TIMEOUT", "NETMASK", "STATS", "STATS64"))
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = (
    _DEST[f"IPVS_DEST_ATTR_{n}"] for n in ("ADDR", "PORT", "FWD_METHOD", "WEIGHT", "U_THRESH", "L_THRESH"))
DEST_ACTIVE_CONNS, DEST_INACT_CONNS, DEST_PERSIST_CONNS, DEST_STATS, DEST_ADDR_FAMILY, DEST_STATS64 = (
    _DEST[f"IPVS_DEST_ATTR_{n}"]
    for n in ("ACTIVE_CONNS", "INACT_CONNS", "PERSIST_CONNS", "STATS", "ADDR_FAMILY", "STATS64"))
# Stats fields in Stats order; in the 32-bit STATS nest only the byte counters are 64-bit.
STATS_ATTRS = tuple(_STATS[f"IPVS_STATS_ATTR_{n.upper()}"] for n in Stats._fields)

_HEADER = struct.Struct("=IHHII")   # struct nlmsghdr
_GENL = struct.Struct("=BBH")       # struct genlmsghdr
_NLA = struct.Struct("=HH")         # struct nlattr
_U16 = struct.Struct("=H")
_BE16 = struct.Struct(">H")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_U64 = struct.Struct("=Q")
_FLAGS = struct.Struct("=II")       # struct ip_vs_flags
NLMSG_HEADER_SIZE = _HEADER.size
HEADER_SIZE = _HEADER.size + _GENL.size
_MAX_ATTR = 16  # above every service, destination and stats attribute


class MalformedReply(ValueError):
    """Bytes that are not a well-formed IPVS reply: truncated, or an attribute too short."""


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size & 3)


# The nests written by the thousand, each packed in one call. `16s` zero-fills an IPv4
# address to union nf_inet_addr, as ipvsadm sends it; ports go in network order (htons
# into a native field); u16 attributes are padded to 4 bytes.
_SERVICE_ID = struct.Struct("=HH" "HHH2x" "HHH2x" "HH16s" "HHH2x")
_DEST_ID = struct.Struct("=HH" "HH16s" "HHH2x" "HHH2x")
_DEST_FULL = struct.Struct(_DEST_ID.format + "HHI" * 4)


def service_id(spec: ServiceSpec) -> bytes:
    """The IPVS_CMD_ATTR_SERVICE nest that names a service (for delete and dest commands)."""
    if spec.fwmark:
        return _attr(CMD_ATTR_SERVICE, _attr(SVC_AF, _U16.pack(spec.family))
                     + _attr(SVC_FWMARK, _U32.pack(spec.fwmark)))
    return _SERVICE_ID.pack(_SERVICE_ID.size, CMD_ATTR_SERVICE, 6, SVC_AF, spec.family,
                            6, SVC_PROTOCOL, PROTOCOLS[spec.protocol], 20, SVC_ADDR, spec.vip,
                            6, SVC_PORT, socket.htons(spec.port))


def service_full(spec: ServiceSpec) -> bytes:
    """The nest that adds or edits a service; the kernel wants every option present."""
    ident = service_id(spec)[4:]
    options = (_attr(SVC_SCHED_NAME, spec.scheduler.encode() + b"\0")
               + _attr(SVC_FLAGS, _FLAGS.pack(spec.flags, SVC_F_MANAGED))
               + _attr(SVC_TIMEOUT, _U32.pack(spec.timeout))
               + _attr(SVC_NETMASK, _U32.pack(spec.netmask)))
    return _attr(CMD_ATTR_SERVICE, ident + options)


def dest_id(dest: DestSpec) -> bytes:
    return _DEST_ID.pack(_DEST_ID.size, CMD_ATTR_DEST, 20, DEST_ADDR, dest.address,
                         6, DEST_PORT, socket.htons(dest.port), 6, DEST_ADDR_FAMILY, dest.family)


def dest_full(dest: DestSpec) -> bytes:
    return _DEST_FULL.pack(_DEST_FULL.size, CMD_ATTR_DEST, 20, DEST_ADDR, dest.address,
                           6, DEST_PORT, socket.htons(dest.port), 6, DEST_ADDR_FAMILY, dest.family,
                           8, DEST_FWD_METHOD, dest.forwarding, 8, DEST_WEIGHT, dest.weight,
                           8, DEST_U_THRESH, dest.u_threshold, 8, DEST_L_THRESH, dest.l_threshold)


def message(family_id: int, cmd: int, flags: int, seq: int, attrs: bytes = b"") -> bytes:
    return (_HEADER.pack(HEADER_SIZE + len(attrs), family_id, flags, seq, 0)
            + _GENL.pack(cmd, messages.VERSION, 0) + attrs)


def set_flags(msg: bytes, flags: int) -> bytes:
    return msg[:6] + _U16.pack(flags) + msg[8:]  # nlmsghdr: len u32, type u16, flags u16


def seq_of(msg: bytes) -> int:
    return _U32.unpack_from(msg, 8)[0]


def split(buf, length: int) -> Iterator[tuple[int, int, int, int]]:
    """Netlink messages in a received datagram: (type, seq, payload offset, end)."""
    off = 0
    while off + _HEADER.size <= length:
        size, kind, _, seq, _ = _HEADER.unpack_from(buf, off)
        if size < _HEADER.size or off + size > length:
            raise MalformedReply(f"netlink message of length {size} at offset {off} of {length}")
        if kind == NLMSG_ERROR and size < _HEADER.size + _I32.size:
            raise MalformedReply(f"netlink error message of length {size} at offset {off}")
        yield kind, seq, off + _HEADER.size, off + size
        off += (size + 3) & ~3


def error_code(buf, payload: int) -> int:
    """errno of an NLMSG_ERROR payload; 0 is an acknowledgement."""
    return -_I32.unpack_from(buf, payload)[0]


def _attrs(buf, off: int, end: int) -> tuple[list[int], list[int]]:
    """Payload offset and length of each attribute type in [off, end); -1 and 0 where
    absent."""
    where = [-1] * _MAX_ATTR
    sizes = [0] * _MAX_ATTR
    unpack = _NLA.unpack_from
    while off + 4 <= end:
        size, kind = unpack(buf, off)
        if size < 4 or off + size > end:
            raise MalformedReply(f"attribute of length {size} at offset {off}, {end - off} bytes left")
        kind &= NLA_TYPE_MASK
        if kind < _MAX_ATTR:
            where[kind] = off + 4
            sizes[kind] = size - 4
        off += (size + 3) & ~3
    return where, sizes


def _require(sizes: list[int], needed: tuple[tuple[int, int], ...], what: str) -> None:
    """Each (attribute, bytes) of `needed` is present with at least that many bytes."""
    for kind, least in needed:
        if sizes[kind] < least:
            raise MalformedReply(f"{what} attribute {kind}: {sizes[kind]} bytes, at least {least} expected")


def _nest(buf, payload: int, end: int, kind: int) -> tuple[int, int]:
    """The payload span of the top-level nest `kind` in a generic-netlink message."""
    off = payload + _GENL.size
    while off + 4 <= end:
        size, found = _NLA.unpack_from(buf, off)
        if size < 4 or off + size > end:
            raise MalformedReply(f"attribute of length {size} at offset {off}, {end - off} bytes left")
        if found & NLA_TYPE_MASK == kind:
            return off + 4, off + size
        off += (size + 3) & ~3
    raise MalformedReply(f"IPVS message without attribute {kind}")


def _stats(buf, at: int, end_of: int, wide: bool) -> Stats:
    where, sizes = _attrs(buf, at, end_of)
    values = []
    for index, kind in enumerate(STATS_ATTRS):
        pos = where[kind]
        if pos < 0:
            values.append(0)
            continue
        field = _U64 if wide or index in (3, 4) else _U32  # inbytes, outbytes are 64-bit in both nests
        if sizes[kind] < field.size:
            raise MalformedReply(f"stats attribute {kind}: {sizes[kind]} bytes, {field.size} expected")
        values.append(field.unpack_from(buf, pos)[0])
    return Stats(*values)


def _stats_of(buf, where: list[int], sizes: list[int], narrow: int, wide: int) -> Stats:
    """STATS64 when the kernel sends it (Linux >= 4.1), else the 32-bit STATS."""
    for kind, is_wide in ((wide, True), (narrow, False)):
        at = where[kind]
        if at >= 0:
            return _stats(buf, at, at + sizes[kind], is_wide)
    return Stats(*([0] * len(Stats._fields)))


# What a reply must hold, in bytes per attribute; the address's width depends on the family.
_SERVICE_NEEDS = ((SVC_AF, 2), (SVC_SCHED_NAME, 1), (SVC_FLAGS, _FLAGS.size), (SVC_TIMEOUT, 4), (SVC_NETMASK, 4))
_SERVICE_ID_NEEDS = ((SVC_PROTOCOL, 2), (SVC_PORT, 2))
_DEST_NEEDS = ((DEST_PORT, 2), (DEST_FWD_METHOD, 4), (DEST_WEIGHT, 4), (DEST_U_THRESH, 4), (DEST_L_THRESH, 4))
_DEST_STATS_NEEDS = ((DEST_ACTIVE_CONNS, 4), (DEST_INACT_CONNS, 4), (DEST_PERSIST_CONNS, 4))


def _width(af: int) -> int:
    return 4 if af == AF_INET else 16


def parse_service(buf, payload: int, end: int, stats: bool = False) -> KernelService:
    off, nest_end = _nest(buf, payload, end, CMD_ATTR_SERVICE)
    a, sizes = _attrs(buf, off, nest_end)
    _require(sizes, _SERVICE_NEEDS, "service")
    af = _U16.unpack_from(buf, a[SVC_AF])[0]
    width = _width(af)
    if a[SVC_FWMARK] >= 0:
        _require(sizes, ((SVC_FWMARK, 4),), "service")
    fwmark = _U32.unpack_from(buf, a[SVC_FWMARK])[0] if a[SVC_FWMARK] >= 0 else 0
    if fwmark:
        protocol, vip, port = "tcp", bytes(width), 0
    else:
        _require(sizes, (*_SERVICE_ID_NEEDS, (SVC_ADDR, width)), "service")
        number = _U16.unpack_from(buf, a[SVC_PROTOCOL])[0]
        protocol = PROTOCOL_NAMES.get(number, str(number))
        vip = bytes(buf[a[SVC_ADDR]:a[SVC_ADDR] + width])
        port = _BE16.unpack_from(buf, a[SVC_PORT])[0]
    sched_at = a[SVC_SCHED_NAME]
    try:
        scheduler = bytes(buf[sched_at:sched_at + sizes[SVC_SCHED_NAME]]).rstrip(b"\0").decode()
    except UnicodeDecodeError as err:
        raise MalformedReply(f"scheduler name not text: {err}") from None
    spec = ServiceSpec(protocol, vip, port, scheduler,
                       _U32.unpack_from(buf, a[SVC_FLAGS])[0] & SVC_F_MANAGED,
                       _U32.unpack_from(buf, a[SVC_TIMEOUT])[0],
                       _U32.unpack_from(buf, a[SVC_NETMASK])[0],
                       fwmark)
    return KernelService(spec, _stats_of(buf, a, sizes, SVC_STATS, SVC_STATS64) if stats else None)


def parse_dest(buf, payload: int, end: int, service_family: int, stats: bool = False) -> KernelDest:
    off, nest_end = _nest(buf, payload, end, CMD_ATTR_DEST)
    a, sizes = _attrs(buf, off, nest_end)
    if a[DEST_ADDR_FAMILY] >= 0:
        _require(sizes, ((DEST_ADDR_FAMILY, 2),), "destination")
    af = _U16.unpack_from(buf, a[DEST_ADDR_FAMILY])[0] if a[DEST_ADDR_FAMILY] >= 0 else service_family
    _require(sizes, (*_DEST_NEEDS, (DEST_ADDR, _width(af))), "destination")
    at = a[DEST_ADDR]
    u32 = _U32.unpack_from
    spec = DestSpec(bytes(buf[at:at + _width(af)]),
                    _BE16.unpack_from(buf, a[DEST_PORT])[0],
                    u32(buf, a[DEST_FWD_METHOD])[0] & CONN_F_FWD_MASK,
                    u32(buf, a[DEST_WEIGHT])[0],
                    u32(buf, a[DEST_U_THRESH])[0],
                    u32(buf, a[DEST_L_THRESH])[0])
    if not stats:
        return KernelDest(spec)
    _require(sizes, _DEST_STATS_NEEDS, "destination")
    return KernelDest(spec, u32(buf, a[DEST_ACTIVE_CONNS])[0], u32(buf, a[DEST_INACT_CONNS])[0],
                      u32(buf, a[DEST_PERSIST_CONNS])[0], _stats_of(buf, a, sizes, DEST_STATS, DEST_STATS64))
