"""Rescue of connects stuck on a quarantined backend where netfilter connection tracking
is active.

IPVS moves a connect stuck in SYN_SENT on a backend at weight 0 to another backend at its
next SYN retransmit (expire_nodest_conn), unless that retransmit belongs to a confirmed
conntrack entry: the entry's reply direction is bound to the old backend, so IPVS drops
the retransmit and expires the connection with its entry, and only the retransmit after
that (3 s into the connect) is scheduled afresh. Deleting the entries of such connects
when their backend is quarantined makes the next retransmit (1 s) new to conntrack, and
IPVS schedules it to a healthy backend at once.

An entry of a connection IPVS masquerades (net.ipv4.vs.conntrack = 1) reads
client -> VIP in the original direction and backend -> client in the reply direction.
Only netlink (ctnetlink), no `conntrack` binary.
"""
from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, NFCTSocket

from ipvslb.model import IPAddress

log = logging.getLogger("ipvslb")

# Exists while nf_conntrack is loaded (ip_vs loads it); entries exist only where some rule
# or IPVS's own conntrack use made the kernel track connections in this namespace.
COUNT = Path("/proc/sys/net/netfilter/nf_conntrack_count")
TCP_CONNTRACK_SYN_SENT = 1  # enum tcp_conntrack

# Deletes are packed here, not by pyroute2: its request path cost 25-40 ms per entry in the
# test VM, and the stuck connects retransmit 1 s after they began, whether the daemon is
# done or not. Numbers from linux/netfilter/nfnetlink*.h and nfnetlink_conntrack.h.
NETLINK_NETFILTER = 12
MSG_CT_DELETE = (1 << 8) | 2          # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_ID = 1, 12
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_IP_SRC = {socket.AF_INET: 1, socket.AF_INET6: 3}   # CTA_IP_V4_SRC, CTA_IP_V6_SRC; DST is +1
REPLY_TIMEOUT = 2.0


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
    # Netlink gives IPv6 addresses in whatever spelling pyroute2 chose: compare as addresses.
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

    Its netlink sockets stay open between rescues: opening them and loading the kernel's
    ctnetlink module cost the first rescue 160 ms in the test VM. `dump_socket(family)`
    opens a pyroute2 NFCTSocket and `delete_socket()` a raw netfilter netlink socket
    (both replaced in unit tests). A failure is logged once and costs only the rescue:
    IPVS still moves the connect, one retransmit later."""

    def __init__(self, count_path: Path = COUNT, dump_socket: Callable | None = None,
                 delete_socket: Callable | None = None):
        self.count_path = count_path
        self._dump_factory = dump_socket or _nfct_socket
        self._delete_factory = delete_socket or _raw_socket
        self._dumpers: dict[int, object] = {}
        self._deleter: socket.socket | None = None
        self._seq = itertools.count(1)
        self.deleted = 0   # entries deleted so far
        self._warned = False

    def prepare(self) -> None:
        """Open the sockets and make the kernel load ctnetlink now, where conntrack is
        loaded at all, so that the first rescue does not pay for it."""
        if self.count_path.exists():
            self._guarded(lambda: (self._dumper(socket.AF_INET).count(), self._socket()))

    def rescue(self, protocol: str, vip: tuple[IPAddress, int], backend: tuple[IPAddress, int]) -> list[Flow]:
        """Delete the entries of connects to `vip` stuck on `backend`; returns those deleted."""
        if protocol != "tcp" or not tracking(self.count_path):
            return []
        family = socket.AF_INET6 if vip[0].version == 6 else socket.AF_INET
        deleted = self._guarded(lambda: self._delete(stuck(_flows(self._dumper(family), family, vip), vip, backend)))
        self.deleted += len(deleted or ())
        return deleted or []

    def _guarded(self, work: Callable):
        try:
            return work()
        except (OSError, NetlinkError) as err:
            self.close()   # reopened at the next rescue
            if not self._warned:
                log.warning("conntrack: cannot read or delete entries (%s): a connect stuck on a quarantined "
                            "backend moves at its second SYN retransmit (3 s), not its first", err)
                self._warned = True
            return None

    def _dumper(self, family: int):
        if family not in self._dumpers:
            self._dumpers[family] = self._dump_factory(family)
        return self._dumpers[family]

    def _socket(self) -> socket.socket:
        if self._deleter is None:
            self._deleter = self._delete_factory()
        return self._deleter

    def _delete(self, flows: list[Flow]) -> list[Flow]:
        """All deletes in one send, then their answers: entries gone meanwhile (answered,
        or expired by IPVS) are not counted."""
        if not flows:
            return []
        sock = self._socket()
        pending = {}
        for flow in flows:
            seq = next(self._seq) & 0xFFFFFFFF
            pending[seq] = flow
        sock.send(b"".join(delete_message(flow, seq) for seq, flow in pending.items()))
        deleted = []
        while pending:
            data = sock.recv(65536)
            for seq, code in acks(data):
                flow = pending.pop(seq, None)
                if flow is None:
                    continue
                if code == 0:
                    deleted.append(flow)
                elif code != errno.ENOENT:
                    raise OSError(code, f"deleting {flow.client[0]} port {flow.client[1]}: {errno.errorcode.get(code, code)}")
        return deleted

    def close(self) -> None:
        for ct in self._dumpers.values():
            ct.close()
        self._dumpers.clear()
        if self._deleter is not None:
            self._deleter.close()
            self._deleter = None


def _raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.settimeout(REPLY_TIMEOUT)
    return sock


def _attr(kind: int, value: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(value), kind)
    return header + value + b"\0" * (-len(value) % 4)


def delete_message(flow: Flow, seq: int) -> bytes:
    """IPCTNL_MSG_CT_DELETE for the flow's original tuple and id (an entry the connect's own
    retransmit made meanwhile has another id and is left alone)."""
    src = CTA_IP_SRC[flow.family]
    ip = _attr(src, socket.inet_pton(flow.family, flow.client[0])) + \
        _attr(src + 1, socket.inet_pton(flow.family, flow.vip[0]))
    proto = _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])) + \
        _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", flow.client[1])) + \
        _attr(CTA_PROTO_DST_PORT, struct.pack("!H", flow.vip[1]))
    body = _attr(CTA_TUPLE_ORIG | NLA_F_NESTED,
                 _attr(CTA_TUPLE_IP | NLA_F_NESTED, ip) + _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, proto))
    if flow.id is not None:
        body += _attr(CTA_ID, struct.pack("!I", flow.id))
    payload = struct.pack("=BBH", flow.family, 0, 0) + body   # struct nfgenmsg, version 0
    return struct.pack("=IHHII", 16 + len(payload), MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload


def acks(data: bytes) -> Iterable[tuple[int, int]]:
    """(sequence number, errno; 0 for success) of each NLMSG_ERROR in a netlink read."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            return
        if kind == NLMSG_ERROR and length >= 20:
            yield seq, -struct.unpack_from("=i", data, offset + 16)[0]
        offset += (length + 3) & ~3


def _nfct_socket(family: int) -> NFCTSocket:
    return NFCTSocket(nfgen_family=family)


def _flows(ct, family: int, vip: tuple[IPAddress, int]) -> list[Flow]:
    # The kernel filters on the original direction (5.8 and later; older kernels ignore the
    # filter and dump everything, which stuck() then sorts out).
    wanted = NFCTAttrTuple(family=family, daddr=str(vip[0]), proto=socket.IPPROTO_TCP, dport=vip[1])
    return [flow for msg in ct.dump(tuple_orig=wanted) if (flow := _flow(family, msg)) is not None]


def _flow(family: int, msg) -> Flow | None:
    orig, reply = msg.get_attr("CTA_TUPLE_ORIG"), msg.get_attr("CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    src, dst = ("CTA_IP_V6_SRC", "CTA_IP_V6_DST") if family == socket.AF_INET6 else ("CTA_IP_V4_SRC", "CTA_IP_V4_DST")

    def ends(tuple_):
        ip, proto = tuple_.get_attr("CTA_TUPLE_IP"), tuple_.get_attr("CTA_TUPLE_PROTO")
        if ip is None or proto is None or proto.get_attr("CTA_PROTO_NUM") != socket.IPPROTO_TCP:
            return None
        return ((ip.get_attr(src), proto.get_attr("CTA_PROTO_SRC_PORT")),
                (ip.get_attr(dst), proto.get_attr("CTA_PROTO_DST_PORT")))

    o, r = ends(orig), ends(reply)
    if o is None or r is None:
        return None
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None
    return Flow(family, o[0], o[1], r[0], state, msg.get_attr("CTA_ID"))
