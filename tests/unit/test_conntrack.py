"""ipvslb.conntrack: which entries the rescue deletes, the bytes it sends, and that a host
without conntrack (or without the right to use it) costs nothing but the rescue."""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

from ipvslb import conntrack
from ipvslb.conntrack import TCP_CONNTRACK_SYN_SENT, Flow

VIP = (ipaddress.ip_address("10.91.0.1"), 80)
DEAD = (ipaddress.ip_address("10.77.2.2"), 8080)
ALIVE = (ipaddress.ip_address("10.77.1.2"), 8080)
ESTABLISHED = 3  # enum tcp_conntrack


def kernel_entry(client_port: int, server: tuple, state: int, ct_id: int, family: int = socket.AF_INET,
                 client: str = "10.91.0.1", vip: tuple = VIP) -> nfct_msg:
    """An entry as ctnetlink sends it for a connect IPVS masqueraded: client -> VIP, and
    back from the backend it chose. Encoded and decoded by pyroute2, as a dump reads it."""
    msg = nfct_msg.create_from(
        tuple_orig=NFCTAttrTuple(family=family, saddr=client, daddr=str(vip[0]), proto=socket.IPPROTO_TCP,
                                 sport=client_port, dport=vip[1]),
        tuple_reply=NFCTAttrTuple(family=family, saddr=str(server[0]), daddr=client, proto=socket.IPPROTO_TCP,
                                  sport=server[1], dport=client_port),
        protoinfo={"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [["CTA_PROTOINFO_TCP_STATE", state]]}]]},
        id=ct_id,
    )
    msg["nfgen_family"] = family
    msg.encode()
    decoded = nfct_msg(msg.data)
    decoded.decode()
    return decoded


def as_kernel_sends(msg: nfct_msg, seq: int) -> bytes:
    msg["header"]["type"] = conntrack.MSG_CT_NEW
    msg["header"]["sequence_number"] = seq
    msg["header"]["flags"] = 0x2  # NLM_F_MULTI
    msg.reset()
    msg.encode()
    return bytes(msg.data)


class FakeKernel:
    """A netfilter netlink socket: answers a dump with `entries` and NLMSG_DONE, each
    delete with an ack (ENOENT for the client ports in `gone`, `refuse` for all others
    if set). Requests are kept, decoded by pyroute2."""

    def __init__(self, entries=(), gone=(), refuse: int = 0, error: OSError | None = None):
        self.entries = list(entries)
        self.gone, self.refuse, self.error = set(gone), refuse, error
        self.requests: list[nfct_msg] = []
        self._answers: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> int:
        if self.error:
            raise self.error
        offset = 0
        while offset < len(data):
            length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
            msg = nfct_msg(data[offset:offset + length])
            msg.decode()
            self.requests.append(msg)
            if kind == conntrack.MSG_CT_GET:
                # One read per entry, as a kernel's dump may split them.
                self._answers += [as_kernel_sends(e, seq) for e in self.entries]
                self._answers.append(struct.pack("=IHHIIi", 20, conntrack.NLMSG_DONE, 2, seq, 0, 0))
            else:
                port = msg.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_SRC_PORT")
                code = -errno.ENOENT if port in self.gone else -self.refuse
                self._answers.append(struct.pack("=IHHIIi", 36, conntrack.NLMSG_ERROR, 0, seq, 0, code) + bytes(16))
            offset += length
        return len(data)

    def recv_into(self, buf) -> int:
        data = self._answers.pop(0)
        buf[:len(data)] = data
        return len(data)

    def deletes(self) -> list[nfct_msg]:
        return [m for m in self.requests if m["header"]["type"] == conntrack.MSG_CT_DELETE]

    def close(self):
        self.closed = True


@pytest.fixture
def count(tmp_path):
    path = tmp_path / "nf_conntrack_count"
    path.write_text("12\n")
    return path


def rescuer(count, kernel=None, opened=None):
    opened = [] if opened is None else opened

    def open_socket():
        opened.append(kernel)
        return kernel

    return conntrack.Rescuer(count, open_socket)


def test_stuck_takes_unanswered_flows_to_the_vip_sent_to_the_backend():
    flows = [
        Flow(socket.AF_INET, ("10.91.0.1", 1), ("10.91.0.1", 80), ("10.77.2.2", 8080), TCP_CONNTRACK_SYN_SENT, 1),
        Flow(socket.AF_INET, ("10.91.0.1", 2), ("10.91.0.1", 80), ("10.77.2.2", 8080), ESTABLISHED, 2),
        Flow(socket.AF_INET, ("10.91.0.1", 3), ("10.91.0.1", 80), ("10.77.1.2", 8080), TCP_CONNTRACK_SYN_SENT, 3),
        Flow(socket.AF_INET, ("10.91.0.1", 4), ("10.91.0.2", 80), ("10.77.2.2", 8080), TCP_CONNTRACK_SYN_SENT, 4),
        Flow(socket.AF_INET, ("10.91.0.1", 5), ("10.91.0.1", 80), ("10.77.2.2", 9090), TCP_CONNTRACK_SYN_SENT, 5),
    ]
    assert [f.id for f in conntrack.stuck(flows, VIP, DEAD)] == [1]


def test_stuck_compares_ipv6_addresses_not_their_spelling():
    vip = (ipaddress.ip_address("fd91::1"), 80)
    flow = Flow(socket.AF_INET6, ("fd91:0::1", 7), ("fd91:0:0::1", 80), ("FD77:2::2", 8080), TCP_CONNTRACK_SYN_SENT, 9)
    assert conntrack.stuck([flow], vip, (ipaddress.ip_address("fd77:2::2"), 8080)) == [flow]


def test_tracking_needs_the_counter_and_an_entry(tmp_path):
    path = tmp_path / "nf_conntrack_count"
    assert not conntrack.tracking(path)
    path.write_text("0\n")
    assert not conntrack.tracking(path)
    path.write_text("3\n")
    assert conntrack.tracking(path)


def orig_of(msg: nfct_msg, family: int = socket.AF_INET) -> tuple:
    orig = msg.get_attr("CTA_TUPLE_ORIG")
    ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
    v = "V4" if family == socket.AF_INET else "V6"
    return (ip.get_attr(f"CTA_IP_{v}_SRC"), ip.get_attr(f"CTA_IP_{v}_DST"), proto.get_attr("CTA_PROTO_NUM"),
            proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT"))


def test_rescue_deletes_exactly_the_stuck_entries_of_the_backend_by_tuple_and_id(count):
    kernel = FakeKernel([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 11),
                         kernel_entry(40002, DEAD, ESTABLISHED, 12),
                         kernel_entry(40003, ALIVE, TCP_CONNTRACK_SYN_SENT, 13),
                         kernel_entry(40004, DEAD, TCP_CONNTRACK_SYN_SENT, 14)])
    r = rescuer(count, kernel)
    freed = r.rescue("tcp", VIP, DEAD)
    assert [(f.client, f.server, f.id) for f in freed] == [(("10.91.0.1", 40001), ("10.77.2.2", 8080), 11),
                                                          (("10.91.0.1", 40004), ("10.77.2.2", 8080), 14)]
    assert [(orig_of(m), m.get_attr("CTA_ID"), m["nfgen_family"]) for m in kernel.deletes()] == [
        (("10.91.0.1", "10.91.0.1", socket.IPPROTO_TCP, 40001, 80), 11, socket.AF_INET),
        (("10.91.0.1", "10.91.0.1", socket.IPPROTO_TCP, 40004, 80), 14, socket.AF_INET)]
    assert r.deleted == 2


def test_the_dump_asks_the_kernel_for_the_vips_tcp_entries_only(count):
    kernel = FakeKernel()
    rescuer(count, kernel).rescue("tcp", VIP, DEAD)
    dump = kernel.requests[0]
    assert dump["header"]["type"] == conntrack.MSG_CT_GET and dump["header"]["flags"] & 0x300 == 0x300
    assert orig_of(dump) == (None, "10.91.0.1", socket.IPPROTO_TCP, None, 80)
    flags = dump.get_attr("CTA_FILTER").get_attr("CTA_FILTER_ORIG_FLAGS")
    # The same flags pyroute2 sets for a filter on destination, protocol and destination port.
    wanted = NFCTAttrTuple(daddr="10.91.0.1", proto=socket.IPPROTO_TCP, dport=80)
    wanted.attrs()
    assert flags == wanted.flags


def test_rescue_of_an_ipv6_service_uses_ipv6_tuples(count):
    vip = (ipaddress.ip_address("fd91::1"), 80)
    dead = (ipaddress.ip_address("fd77:2::2"), 8080)
    kernel = FakeKernel([kernel_entry(40001, dead, TCP_CONNTRACK_SYN_SENT, 5, socket.AF_INET6, "fd91::1", vip),
                         kernel_entry(40002, DEAD, TCP_CONNTRACK_SYN_SENT, 6)])
    freed = rescuer(count, kernel).rescue("tcp", vip, dead)
    assert [f.client for f in freed] == [("fd91::1", 40001)]
    assert kernel.requests[0]["nfgen_family"] == socket.AF_INET6
    assert [orig_of(m, socket.AF_INET6) for m in kernel.deletes()] == [
        ("fd91::1", "fd91::1", socket.IPPROTO_TCP, 40001, 80)]


def test_an_entry_gone_before_its_delete_is_not_counted(count):
    kernel = FakeKernel([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 1),
                         kernel_entry(40002, DEAD, TCP_CONNTRACK_SYN_SENT, 2)], gone={40001})
    assert [f.client[1] for f in rescuer(count, kernel).rescue("tcp", VIP, DEAD)] == [40002]


def test_without_tracked_entries_or_for_udp_no_socket_is_opened(tmp_path, count):
    opened = []
    assert rescuer(tmp_path / "absent", opened=opened).rescue("tcp", VIP, DEAD) == []
    empty = tmp_path / "empty"
    empty.write_text("0\n")
    assert rescuer(empty, opened=opened).rescue("tcp", VIP, DEAD) == []
    assert rescuer(count, opened=opened).rescue("udp", VIP, DEAD) == []
    assert opened == []


def test_the_socket_stays_open_between_rescues_and_prepare_loads_ctnetlink(count):
    opened = []
    kernel = FakeKernel([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 1)])
    r = rescuer(count, kernel, opened)
    r.prepare()
    assert [m["header"]["type"] for m in kernel.requests] == [conntrack.MSG_CT_GET]
    r.rescue("tcp", VIP, DEAD)
    r.rescue("tcp", VIP, DEAD)
    assert len(opened) == 1
    r.close()
    assert kernel.closed


def test_prepare_opens_nothing_without_conntrack(tmp_path):
    opened = []
    rescuer(tmp_path / "absent", opened=opened).prepare()
    assert opened == []


def test_a_failing_kernel_costs_only_the_rescue_and_is_logged_once(count, caplog):
    opened = []
    kernel = FakeKernel(error=PermissionError(errno.EPERM, "Operation not permitted"))
    r = rescuer(count, kernel, opened)
    with caplog.at_level(logging.WARNING, logger="ipvslb"):
        assert r.rescue("tcp", VIP, DEAD) == []
        assert r.rescue("tcp", VIP, DEAD) == []
    assert len([rec for rec in caplog.records if "conntrack" in rec.getMessage()]) == 1
    assert kernel.closed
    assert len(opened) == 2   # reopened for the second rescue


def test_a_delete_the_kernel_refuses_fails_the_rescue_without_raising(count, caplog):
    kernel = FakeKernel([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 1)], refuse=errno.EPERM)
    with caplog.at_level(logging.WARNING, logger="ipvslb"):
        assert rescuer(count, kernel).rescue("tcp", VIP, DEAD) == []
    assert "EPERM" in caplog.text


def test_parse_entry_skips_what_is_not_a_tcp_entry_of_the_server():
    data = as_kernel_sends(kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 7), 1)
    assert conntrack.parse_entry(data, 16, len(data), (DEAD[0].packed, DEAD[1])).id == 7
    assert conntrack.parse_entry(data, 16, len(data), (ALIVE[0].packed, ALIVE[1])) is None
    # Truncated anywhere: no entry, never an exception or a value read past the end.
    for cut in range(16, len(data)):
        flow = conntrack.parse_entry(data, 16, cut)
        assert flow is None or flow.client == ("10.91.0.1", 40001)


def test_messages_stop_at_a_truncated_message():
    ok = struct.pack("=IHHIIi", 36, conntrack.NLMSG_ERROR, 0, 5, 0, 0) + bytes(16)
    assert [m[:2] for m in conntrack._messages(ok + ok[:20], len(ok) + 20)] == [(conntrack.NLMSG_ERROR, 5)]
