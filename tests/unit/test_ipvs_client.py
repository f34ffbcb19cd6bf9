"""The client's batching and dump protocol, against tests/unit/fake_ipvs.py."""
from __future__ import annotations

import errno
import ipaddress
import re
import struct
from pathlib import Path

import pytest

from ipvslb.ipvs import client as client_module
from ipvslb.ipvs import messages
from ipvslb.ipvs.client import IPVS, IPVSError
from ipvslb.ipvs.specs import DestSpec, Op, OpKind, ServiceSpec, Stats
from tests.unit.fake_ipvs import FAMILY, FakeKernel

ip = ipaddress.ip_address
WEB = ServiceSpec("tcp", ip("10.90.0.1").packed, 80, "wlc", 0, 0, 0xFFFFFFFF)
WEB6 = ServiceSpec("udp", ip("fd90::1").packed, 53, "sh", 0x11, 300, 128)


def dest(n: int, weight: int = 1) -> DestSpec:
    return DestSpec(ip(f"10.77.{n // 250}.{n % 250 + 1}").packed, 8080, 0, weight)


@pytest.fixture
def kernel():
    return FakeKernel()


@pytest.fixture
def ipvs(kernel):
    return IPVS(sock=kernel, family=FAMILY)


def test_writes_go_out_in_batches_with_one_acknowledgement_each(ipvs, kernel):
    ops = [Op(OpKind.ADD_SERVICE, WEB)] + [Op(OpKind.ADD_DEST, WEB, dest(n)) for n in range(600)]
    assert ipvs.execute(ops) == []
    assert ipvs.writes == 601
    assert kernel.datagrams == 3  # 256 messages at most per datagram
    assert not kernel.replies     # every acknowledgement consumed
    assert len(kernel.dests[next(iter(kernel.dests))]) == 600


def test_a_failure_is_reported_for_its_own_operation_and_the_rest_proceeds(ipvs, kernel):
    ops = [Op(OpKind.EDIT_SERVICE, WEB), Op(OpKind.ADD_SERVICE, WEB), Op(OpKind.EDIT_DEST, WEB, dest(1)),
           Op(OpKind.ADD_DEST, WEB, dest(1)), Op(OpKind.ADD_SERVICE, WEB6)]
    failures = ipvs.execute(ops)
    assert [(f.op.kind, f.errno) for f in failures] == [(OpKind.EDIT_SERVICE, errno.ESRCH),
                                                        (OpKind.EDIT_DEST, errno.ENOENT)]
    assert len(kernel.services) == 2
    assert "edit-service" in str(failures[0]) and "ESRCH" in str(failures[0])


def test_already_done_counts_as_done(ipvs):
    ops = [Op(OpKind.ADD_SERVICE, WEB), Op(OpKind.ADD_DEST, WEB, dest(1))]
    assert ipvs.execute(ops + ops) == []
    assert ipvs.execute([Op(OpKind.DELETE_DEST, WEB, dest(1))] * 2 + [Op(OpKind.DELETE_SERVICE, WEB)] * 2
                        + [Op(OpKind.DELETE_DEST, WEB, dest(1))]) == []


def test_single_operations_raise(ipvs):
    ipvs.add_service(WEB)
    with pytest.raises(IPVSError) as err:
        ipvs.edit_dest(WEB, dest(1))
    assert err.value.errno == errno.ENOENT


def test_dumps_read_back_what_was_written(ipvs):
    ipvs.execute([Op(OpKind.ADD_SERVICE, WEB), Op(OpKind.ADD_SERVICE, WEB6), Op(OpKind.ADD_DEST, WEB, dest(1, 5)),
                  Op(OpKind.ADD_DEST, WEB6, DestSpec(ip("fd77:1::2").packed, 8080, 2, 3))])
    assert sorted(s.spec for s in ipvs.services()) == sorted([WEB, WEB6])
    assert [d.spec for d in ipvs.dests(WEB6)] == [DestSpec(ip("fd77:1::2").packed, 8080, 2, 3)]
    (d,) = ipvs.dests(WEB, stats=True)
    assert (d.spec, d.active_conns, d.inactive_conns, d.persistent_conns) == (dest(1, 5), 3, 2, 1)
    assert d.stats == Stats(7, 70, 60, 7000, 6000, 0, 0, 0, 0, 0)
    assert ipvs.dests(ServiceSpec("tcp", ip("10.9.9.9").packed, 1, "rr", 0, 0, 0)) == []
    assert ipvs.writes == 4


def test_lost_replies_are_an_error_not_a_hang(kernel):
    class Overrun(FakeKernel):
        def recv_into(self, buf):
            raise OSError(errno.ENOBUFS, "No buffer space available")

    with pytest.raises(IPVSError, match="lost"):
        IPVS(sock=Overrun(), family=FAMILY).add_service(WEB)


def test_a_malformed_dump_reply_is_an_error_not_a_hang(ipvs, kernel):
    ipvs.add_service(WEB)

    class Garbled(FakeKernel):
        """Answers a dump with a service whose nest holds a zero-length attribute."""

        def __init__(self):
            super().__init__()
            self.sent = 0

        def send(self, data):
            seq = struct.unpack_from("=I", data, 8)[0]
            genl = struct.pack("=BBH", messages.CMD_NEW_SERVICE, 1, 0)
            nest = struct.pack("=HH", 8, 1) + struct.pack("=HH", 0, 1)  # a nest holding a 0-length attribute
            body = genl + nest
            self.replies.append(struct.pack("=IHHII", 16 + len(body), FAMILY, 2, seq, 0) + body)
            return len(data)

    with pytest.raises(IPVSError) as err:
        IPVS(sock=Garbled(), family=FAMILY).services()
    assert err.value.errno == errno.EBADMSG and "malformed IPVS reply" in str(err.value)


def test_a_truncated_reply_is_an_error(kernel):
    class Truncated(FakeKernel):
        def recv_into(self, buf):
            n = super().recv_into(buf)
            return n - 4

    with pytest.raises(IPVSError) as err:
        IPVS(sock=Truncated(), family=FAMILY).add_service(WEB)
    assert err.value.errno == errno.EBADMSG


def test_a_silent_kernel_is_an_error_well_before_the_watchdog():
    unit = (Path(__file__).resolve().parents[2] / "packaging/ipvslb.service").read_text()
    watchdog = float(re.search(r"^WatchdogSec=(\d+)s$", unit, re.M).group(1))
    # A reply wait plus the verify that follows must fit in one watchdog period many times over.
    assert client_module.REPLY_TIMEOUT * 4 <= watchdog

    class Silent(FakeKernel):
        def recv_into(self, buf):
            raise TimeoutError("timed out")

    with pytest.raises(IPVSError) as err:
        IPVS(sock=Silent(), family=FAMILY).services()
    assert err.value.errno == errno.ETIMEDOUT and f"in {client_module.REPLY_TIMEOUT:.0f} s" in str(err.value)


def test_commands_are_numbered_as_in_ip_vs_h():
    commands = (messages.CMD_NEW_SERVICE, messages.CMD_GET_DEST, messages.CMD_GET_INFO, messages.CMD_FLUSH)
    assert commands == (1, 8, 15, 17)
    assert client_module.BATCH_MESSAGES * 200 < client_module.BUFFER_BYTES
