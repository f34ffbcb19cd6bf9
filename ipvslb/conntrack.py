"""Rescue of connects stuck on a quarantined backend where netfilter connection tracking
is active.

IPVS moves a connect stuck in SYN_SENT on a backend at weight 0 to another backend at its
next SYN retransmit (expire_nodest_conn), unless that retransmit belongs to a confirmed
conntrack entry: the entry's reply direction is bound to the old backend, so IPVS drops
the retransmit and expires the connection with its entry, and only the retransmit after
that (3 s into the connect on 6.1, 2 s on 6.12) is scheduled afresh. Deleting the entries of such connects
when their backend is quarantined makes the next retransmit (1 s) new to conntrack, and
IPVS schedules it to a healthy backend at once.

An entry of a connection IPVS masquerades (net.ipv4.vs.conntrack = 1) reads
client -> VIP in the original direction and backend -> client in the reply direction.
ctnetlink is spoken here with `struct`, as ipvslb.ipvs.codec speaks IPVS: a dump holds
every entry of the VIP, hundreds on a busy client (closed connects linger for minutes),
and pyroute2's decoder took 670 ms for them in the test VM while the stuck connects'
retransmits are due 1 s after they began. No `conntrack` binary.
"""
from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from ipvslb.model import IPAddress

log = logging.getLogger("ipvslb")

# Exists while nf_conntrack is loaded (ip_vs loads it); entries exist only where some rule
# or IPVS's own conntrack use made the kernel track connections in this namespace.
COUNT = Path("/proc/sys/net/netfilter/nf_conntrack_count")
TCP_CONNTRACK_SYN_SENT = 1  # enum tcp_conntrack

# From linux/netlink.h, netfilter/nfnetlink.h and netfilter/nfnetlink_conntrack.h.
NETLINK_NETFILTER = 12
MSG_CT_NEW, MSG_CT_GET, MSG_CT_DELETE = ((1 << 8) | n for n in (0, 1, 2))  # NFNL_SUBSYS_CTNETLINK
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED, NLA_TYPE_MASK = 0x8000, 0x3FFF
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_PROTOINFO, CTA_ID, CTA_FILTER = 1, 2, 4, 12, 25
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
CTA_FILTER_ORIG_FLAGS = 1
FILTER_IP_DST, FILTER_PROTO_NUM, FILTER_PROTO_DST_PORT = 1 << 1, 1 << 3, 1 << 5
CTA_IP_SRC: dict[int, int] = {socket.AF_INET: 1, socket.AF_INET6: 3}   # CTA_IP_V4_SRC, CTA_IP_V6_SRC; DST is +1
REPLY_TIMEOUT = 2.0
RECV_BYTES = 256 << 10

_HEADER = struct.Struct("=IHHII")   # struct nlmsghdr
_NFGEN = struct.Struct("=BBH")      # struct nfgenmsg
_NLA = struct.Struct("=HH")         # struct nlattr


class Flow(NamedTuple):
    """One conntrack entry as the rescue needs it."""

    family: int
    client: tuple[str, int]     # original source
    vip: tuple[str, int]        # original destination
    server: tuple[str, int]     # reply source: the backend IPVS chose
    tcp_state: int | None
    id: int | None


def stuck(flows: Iterable[Flow], vip: tuple[IPAddress, int], backend: tuple[IPAddress, int]) -> list[Flow]:
    """The flows to `vip` that IPVS sent to `backend` and that never got an answer."""
    want_vip = (str(vip[0]), vip[1])
    want_server = (str(backend[0]), backend[1])
    return [f for f in flows if f.tcp_state == TCP_CONNTRACK_SYN_SENT
            and _same(f.vip, want_vip) and _same(f.server, want_server)]


def _same(a: tuple[str, int], b: tuple[str, int]) -> bool:
    return a[1] == b[1] and ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])


def tracking(count_path: Path = COUNT) -> bool:
    """Whether the kernel holds any conntrack entry now: without one there is nothing to
    delete, and no netlink socket is opened."""
    try:
        return int(count_path.read_text()) > 0
    except (OSError, ValueError):
        return False


class Rescuer:
    """Deletes the conntrack entries of a quarantined backend's unanswered connects.

    Its netlink socket stays open between rescues: opening it and loading the kernel's
    ctnetlink module cost the first rescue 160 ms in the test VM. `open_socket()` opens a
    netfilter netlink socket (replaced in unit tests). A failure is logged once and costs
    only the rescue: IPVS still moves the connect, one retransmit later."""

    def __init__(self, count_path: Path = COUNT, open_socket: Callable[[], socket.socket] | None = None):
        self.count_path = count_path
        self._open = open_socket or _netfilter_socket
        self._sock: socket.socket | None = None
        self._buf = bytearray(RECV_BYTES)
        self._seq = itertools.count(1)
        self.deleted = 0   # entries deleted so far
        self._warned = False

    def prepare(self) -> None:
        """Open the socket and make the kernel load ctnetlink now (one empty dump), where
        conntrack is loaded at all, so that the first rescue does not pay for it."""
        if self.count_path.exists():
            self._guarded(lambda: self.flows(socket.AF_INET, "0.0.0.0", 0))

    def rescue(self, protocol: str, vip: tuple[IPAddress, int], backend: tuple[IPAddress, int]) -> list[Flow]:
        """Delete the entries of connects to `vip` stuck on `backend`; returns those deleted."""
        if protocol != "tcp" or not tracking(self.count_path):
            return []
        family = socket.AF_INET6 if vip[0].version == 6 else socket.AF_INET
        deleted = self._guarded(lambda: self._delete(stuck(self.flows(family, str(vip[0]), vip[1],
                                                                      server=backend), vip, backend)))
        self.deleted += len(deleted or ())
        return deleted or []

    def flows(self, family: int, vip: str, port: int, server: tuple[IPAddress, int] | None = None) -> list[Flow]:
        """The TCP entries to vip:port (with `server`, only those it answers for). The kernel
        filters on the original direction from 5.8 on; older ones send every entry."""
        sock = self._socket()
        seq = next(self._seq) & 0xFFFFFFFF
        sock.send(dump_message(family, vip, port, seq))
        wanted = None if server is None else (server[0].packed, server[1])
        out: list[Flow] = []
        while True:
            length = sock.recv_into(self._buf)
            for kind, mseq, offset, end in _messages(self._buf, length):
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", self._buf, offset)[0]
                    if code:
                        raise OSError(code, f"conntrack dump: {errno.errorcode.get(code, code)}")
                    continue
                if kind == MSG_CT_NEW and (flow := parse_entry(self._buf, offset, end, wanted)) is not None:
                    out.append(flow)

    def _guarded(self, work: Callable):
        try:
            return work()
        except OSError as err:
            self.close()   # reopened at the next rescue
            if not self._warned:
                log.warning("conntrack: cannot read or delete entries (%s): a connect stuck on a quarantined "
                            "backend moves at its second SYN retransmit (2-3 s), not its first", err)
                self._warned = True
            return None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._open()
        return self._sock

    def _delete(self, flows: list[Flow]) -> list[Flow]:
        """All deletes in one send, then their answers: entries gone meanwhile (answered,
        or expired by IPVS) are not counted."""
        if not flows:
            return []
        sock = self._socket()
        pending = {next(self._seq) & 0xFFFFFFFF: flow for flow in flows}
        sock.send(b"".join(delete_message(flow, seq) for seq, flow in pending.items()))
        deleted = []
        while pending:
            length = sock.recv_into(self._buf)
            for kind, seq, offset, _ in _messages(self._buf, length):
                flow = pending.pop(seq, None) if kind == NLMSG_ERROR else None
                if flow is None:
                    continue
                code = -struct.unpack_from("=i", self._buf, offset)[0]
                if code == 0:
                    deleted.append(flow)
                elif code != errno.ENOENT:
                    raise OSError(code, f"deleting the entry of {flow.client[0]} port {flow.client[1]}: "
                                        f"{errno.errorcode.get(code, code)}")
        return deleted

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _netfilter_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.settimeout(REPLY_TIMEOUT)
    return sock


# -- packing -----------------------------------------------------------------------------

def _attr(kind: int, value: bytes) -> bytes:
    return _NLA.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def _message(kind: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    payload = _NFGEN.pack(family, 0, 0) + body   # struct nfgenmsg, NFNETLINK_V0
    return _HEADER.pack(16 + len(payload), kind, flags, seq, 0) + payload


def _tuple(family: int, src: str | None, dst: str, sport: int | None, dport: int) -> bytes:
    kind = CTA_IP_SRC[family]
    ip = (_attr(kind, socket.inet_pton(family, src)) if src is not None else b"") + \
        _attr(kind + 1, socket.inet_pton(family, dst))
    proto = _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])) + \
        (_attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport)) if sport is not None else b"") + \
        _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    return _attr(CTA_TUPLE_IP | NLA_F_NESTED, ip) + _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, proto)


def dump_message(family: int, vip: str, port: int, seq: int) -> bytes:
    """IPCTNL_MSG_CT_GET dump of the TCP entries whose original destination is vip:port."""
    body = _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, _tuple(family, None, vip, None, port)) + \
        _attr(CTA_FILTER | NLA_F_NESTED, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack(
            "=I", FILTER_IP_DST | FILTER_PROTO_NUM | FILTER_PROTO_DST_PORT)))
    return _message(MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, body)


def delete_message(flow: Flow, seq: int) -> bytes:
    """IPCTNL_MSG_CT_DELETE for the flow's original tuple and id (an entry the connect's own
    retransmit made meanwhile has another id and is left alone)."""
    body = _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, _tuple(flow.family, flow.client[0], flow.vip[0],
                                                       flow.client[1], flow.vip[1]))
    if flow.id is not None:
        body += _attr(CTA_ID, struct.pack("!I", flow.id))
    return _message(MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, flow.family, body)


# -- unpacking: lengths are checked, a short or overlong piece ends the walk -------------

def _messages(buf, length: int) -> Iterator[tuple[int, int, int, int]]:
    """(type, sequence number, payload offset, end) of each netlink message in buf[:length]."""
    offset = 0
    while offset + 16 <= length:
        size, kind, _, seq, _ = _HEADER.unpack_from(buf, offset)
        if size < 16 or offset + size > length:
            return
        yield kind, seq, offset + 16, offset + size
        offset += (size + 3) & ~3


def _attrs(buf, offset: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (value offset, value end) of the attributes in buf[offset:end]."""
    out = {}
    while offset + 4 <= end:
        size, kind = _NLA.unpack_from(buf, offset)
        if size < 4 or offset + size > end:
            break
        out[kind & NLA_TYPE_MASK] = (offset + 4, offset + size)
        offset += (size + 3) & ~3
    return out


def _ends(buf, family: int, span: tuple[int, int] | None):
    """((source address, port), (destination address, port)) of a TCP tuple, else None."""
    if span is None:
        return None
    parts = _attrs(buf, *span)
    ip, proto = parts.get(CTA_TUPLE_IP), parts.get(CTA_TUPLE_PROTO)
    if ip is None or proto is None:
        return None
    addresses, ports = _attrs(buf, *ip), _attrs(buf, *proto)
    num = ports.get(CTA_PROTO_NUM)
    src, dst = addresses.get(CTA_IP_SRC[family]), addresses.get(CTA_IP_SRC[family] + 1)
    sport, dport = ports.get(CTA_PROTO_SRC_PORT), ports.get(CTA_PROTO_DST_PORT)
    if num is None or buf[num[0]] != socket.IPPROTO_TCP:
        return None
    if src is None or dst is None or sport is None or dport is None:
        return None
    return ((bytes(buf[src[0]:src[1]]), struct.unpack_from("!H", buf, sport[0])[0]),
            (bytes(buf[dst[0]:dst[1]]), struct.unpack_from("!H", buf, dport[0])[0]))


def parse_entry(buf, offset: int, end: int, server: tuple[bytes, int] | None = None) -> Flow | None:
    """A conntrack entry's Flow, or None when it is no TCP entry or (with `server`, packed
    address and port) not answered for by that server: most of a dump, skipped cheaply."""
    if end - offset < 4:
        return None
    family = buf[offset]
    if family not in CTA_IP_SRC:
        return None
    top = _attrs(buf, offset + 4, end)
    reply = _ends(buf, family, top.get(CTA_TUPLE_REPLY))
    if reply is None or (server is not None and reply[0] != server):
        return None
    orig = _ends(buf, family, top.get(CTA_TUPLE_ORIG))
    if orig is None:
        return None
    state = None
    if ((info := top.get(CTA_PROTOINFO)) and (tcp := _attrs(buf, *info).get(CTA_PROTOINFO_TCP))
            and (value := _attrs(buf, *tcp).get(CTA_PROTOINFO_TCP_STATE)) and value[1] > value[0]):
        state = buf[value[0]]
    ct_id = top.get(CTA_ID)
    text = lambda packed: socket.inet_ntop(family, packed)  # noqa: E731
    return Flow(family, (text(orig[0][0]), orig[0][1]), (text(orig[1][0]), orig[1][1]),
                (text(reply[0][0]), reply[0][1]), state,
                struct.unpack_from("!I", buf, ct_id[0])[0] if ct_id and ct_id[1] - ct_id[0] >= 4 else None)
