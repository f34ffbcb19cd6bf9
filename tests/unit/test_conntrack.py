"""ipvslb.conntrack: which entries the rescue deletes, the bytes it sends, and that a host
without conntrack (or without the right to use it) costs nothing but the rescue."""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct

import pytest
from pyroute2.netlink.exceptions import NetlinkError
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


class FakeDumpSocket:
    def __init__(self, entries=(), error: Exception | None = None):
        self.entries = list(entries)
        self.error = error
        self.filters = []
        self.counted = 0
        self.closed = False

    def dump(self, tuple_orig=None):
        if self.error:
            raise self.error
        self.filters.append(tuple_orig)
        return self.entries

    def count(self):
        self.counted += 1
        return []

    def close(self):
        self.closed = True


class FakeDeleteSocket:
    """Answers each delete with an ack, ENOENT for the client ports in `gone`."""

    def __init__(self, gone=()):
        self.gone = set(gone)
        self.sent: list[nfct_msg] = []
        self._answers = b""
        self.closed = False

    def send(self, data: bytes) -> int:
        offset = 0
        while offset < len(data):
            length, _, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
            msg = nfct_msg(data[offset:offset + length])
            msg.decode()
            self.sent.append(msg)
            port = msg.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_SRC_PORT")
            code = -errno.ENOENT if port in self.gone else 0
            self._answers += struct.pack("=IHHIIi", 36, conntrack.NLMSG_ERROR, 0, seq, 0, code) + bytes(16)
            offset += length
        return len(data)

    def recv(self, size: int) -> bytes:
        answers, self._answers = self._answers, b""
        return answers

    def close(self):
        self.closed = True


@pytest.fixture
def count(tmp_path):
    path = tmp_path / "nf_conntrack_count"
    path.write_text("12\n")
    return path


def rescuer(count, dumper=None, deleter=None, opened=None):
    opened = [] if opened is None else opened

    def dump_socket(family):
        opened.append(("dump", family))
        return dumper

    def delete_socket():
        opened.append(("delete",))
        return deleter

    return conntrack.Rescuer(count, dump_socket, delete_socket)


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


def test_rescue_deletes_exactly_the_stuck_entries_of_the_backend_by_tuple_and_id(count):
    dumper = FakeDumpSocket([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 11),
                             kernel_entry(40002, DEAD, ESTABLISHED, 12),
                             kernel_entry(40003, ALIVE, TCP_CONNTRACK_SYN_SENT, 13),
                             kernel_entry(40004, DEAD, TCP_CONNTRACK_SYN_SENT, 14)])
    deleter = FakeDeleteSocket()
    r = rescuer(count, dumper, deleter)
    freed = r.rescue("tcp", VIP, DEAD)
    assert [(f.client, f.id) for f in freed] == [(("10.91.0.1", 40001), 11), (("10.91.0.1", 40004), 14)]
    sent = [(m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_IP").get_attr("CTA_IP_V4_SRC"),
             m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_IP").get_attr("CTA_IP_V4_DST"),
             m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_SRC_PORT"),
             m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_DST_PORT"),
             m.get_attr("CTA_ID"), m["header"]["type"], m["nfgen_family"]) for m in deleter.sent]
    assert sent == [("10.91.0.1", "10.91.0.1", 40001, 80, 11, conntrack.MSG_CT_DELETE, socket.AF_INET),
                    ("10.91.0.1", "10.91.0.1", 40004, 80, 14, conntrack.MSG_CT_DELETE, socket.AF_INET)]
    # The kernel is asked for the VIP's TCP flows only.
    wanted = dumper.filters[0]
    assert (wanted.daddr, wanted.dport, wanted.proto) == ("10.91.0.1", 80, socket.IPPROTO_TCP)
    assert r.deleted == 2


def test_rescue_of_an_ipv6_service_uses_ipv6_tuples(count):
    vip = (ipaddress.ip_address("fd91::1"), 80)
    dead = (ipaddress.ip_address("fd77:2::2"), 8080)
    opened = []
    dumper = FakeDumpSocket([kernel_entry(40001, dead, TCP_CONNTRACK_SYN_SENT, 5, socket.AF_INET6, "fd91::1", vip)])
    deleter = FakeDeleteSocket()
    freed = rescuer(count, dumper, deleter, opened).rescue("tcp", vip, dead)
    assert [f.client for f in freed] == [("fd91::1", 40001)]
    assert ("dump", socket.AF_INET6) in opened
    orig = deleter.sent[0].get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_IP")
    assert (orig.get_attr("CTA_IP_V6_SRC"), orig.get_attr("CTA_IP_V6_DST")) == ("fd91::1", "fd91::1")
    assert deleter.sent[0]["nfgen_family"] == socket.AF_INET6


def test_an_entry_gone_before_its_delete_is_not_counted(count):
    dumper = FakeDumpSocket([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 1),
                             kernel_entry(40002, DEAD, TCP_CONNTRACK_SYN_SENT, 2)])
    freed = rescuer(count, dumper, FakeDeleteSocket(gone={40001})).rescue("tcp", VIP, DEAD)
    assert [f.client[1] for f in freed] == [40002]


def test_without_tracked_entries_or_for_udp_no_socket_is_opened(tmp_path, count):
    opened = []
    assert rescuer(tmp_path / "absent", opened=opened).rescue("tcp", VIP, DEAD) == []
    empty = tmp_path / "empty"
    empty.write_text("0\n")
    assert rescuer(empty, opened=opened).rescue("tcp", VIP, DEAD) == []
    assert rescuer(count, opened=opened).rescue("udp", VIP, DEAD) == []
    assert opened == []


def test_sockets_stay_open_between_rescues_and_prepare_loads_ctnetlink(count):
    opened = []
    dumper = FakeDumpSocket([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 1)])
    r = rescuer(count, dumper, FakeDeleteSocket(), opened)
    r.prepare()
    assert dumper.counted == 1
    r.rescue("tcp", VIP, DEAD)
    r.rescue("tcp", VIP, DEAD)
    assert opened == [("dump", socket.AF_INET), ("delete",)]
    r.close()
    assert dumper.closed


def test_prepare_opens_nothing_without_conntrack(tmp_path):
    opened = []
    rescuer(tmp_path / "absent", opened=opened).prepare()
    assert opened == []


@pytest.mark.parametrize("error", [OSError(errno.EPERM, "Operation not permitted"), NetlinkError(errno.EPERM)])
def test_a_failing_kernel_costs_only_the_rescue_and_is_logged_once(count, caplog, error):
    opened = []
    dumper = FakeDumpSocket(error=error)
    r = rescuer(count, dumper, FakeDeleteSocket(), opened)
    with caplog.at_level(logging.WARNING, logger="ipvslb"):
        assert r.rescue("tcp", VIP, DEAD) == []
        assert r.rescue("tcp", VIP, DEAD) == []
    assert len([rec for rec in caplog.records if "conntrack" in rec.getMessage()]) == 1
    assert dumper.closed
    assert opened.count(("dump", socket.AF_INET)) == 2   # reopened for the second rescue


def test_a_delete_the_kernel_refuses_fails_the_rescue_without_raising(count, caplog):
    class Refusing(FakeDeleteSocket):
        def send(self, data):
            super().send(data)
            self._answers = self._answers[:-20] + struct.pack("=i", -errno.EPERM) + bytes(16)
            return len(data)

    dumper = FakeDumpSocket([kernel_entry(40001, DEAD, TCP_CONNTRACK_SYN_SENT, 1)])
    with caplog.at_level(logging.WARNING, logger="ipvslb"):
        assert rescuer(count, dumper, Refusing()).rescue("tcp", VIP, DEAD) == []
    assert "EPERM" in caplog.text


def test_acks_stop_at_a_truncated_message():
    ok = struct.pack("=IHHIIi", 36, conntrack.NLMSG_ERROR, 0, 5, 0, 0) + bytes(16)
    assert list(conntrack.acks(ok + ok[:20])) == [(5, 0)]
    assert list(conntrack.acks(struct.pack("=IHHII", 8, conntrack.NLMSG_ERROR, 0, 1, 0))) == []
