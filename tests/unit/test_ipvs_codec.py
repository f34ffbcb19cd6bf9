"""The struct codec against pyroute2's reading of the same schema (ipvslb.ipvs.messages)."""
from __future__ import annotations

import ipaddress
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipvslb.ipvs import codec, messages
from ipvslb.ipvs.specs import DestSpec, ServiceSpec, Stats

ip = ipaddress.ip_address
V4_SERVICE = ServiceSpec("tcp", ip("10.90.0.1").packed, 80, "wlc", 0, 0, 0xFFFFFFFF)
V6_SERVICE = ServiceSpec("udp", ip("fd90::1").packed, 53, "sh", 0x0001 | 0x0010, 300, 128)
FWMARK_SERVICE = ServiceSpec("tcp", bytes(4), 0, "rr", 0, 0, 0xFFFFFFFF, fwmark=7)


def decode(data: bytes):
    msg = messages.ipvsmsg(data)
    msg.decode()
    return msg


@pytest.mark.parametrize("spec", [V4_SERVICE, V6_SERVICE])
def test_service_message_reads_back_through_pyroute2(spec):
    msg = decode(codec.message(0x1F, messages.CMD_NEW_SERVICE, codec.NLM_F_REQUEST, 42, codec.service_full(spec)))
    assert (msg["cmd"], msg["version"], msg["header"]["sequence_number"], msg["header"]["type"]) == (1, 1, 42, 0x1F)
    svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    assert svc.get_attr("IPVS_SVC_ATTR_AF") == (2 if len(spec.vip) == 4 else 10)
    assert svc.get_attr("IPVS_SVC_ATTR_PROTOCOL") == {"tcp": 6, "udp": 17}[spec.protocol]
    assert svc.get_attr("IPVS_SVC_ATTR_ADDR") == spec.vip.ljust(16, b"\0")
    assert svc.get_attr("IPVS_SVC_ATTR_PORT") == spec.port
    assert svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == spec.scheduler
    flags = svc.get_attr("IPVS_SVC_ATTR_FLAGS")
    assert (flags["flags"], flags["mask"]) == (spec.flags, 0x3D)  # never the kernel's HASHED bit
    assert svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") == spec.timeout
    assert svc.get_attr("IPVS_SVC_ATTR_NETMASK") == spec.netmask


def test_fwmark_service_is_named_by_family_and_mark():
    svc = decode(codec.message(0x1F, messages.CMD_DEL_SERVICE, 1, 1, codec.service_id(FWMARK_SERVICE))
                 ).get_attr("IPVS_CMD_ATTR_SERVICE")
    assert [name for name, _ in svc["attrs"]] == ["IPVS_SVC_ATTR_AF", "IPVS_SVC_ATTR_FWMARK"]
    assert svc.get_attr("IPVS_SVC_ATTR_FWMARK") == 7


def test_dest_messages_read_back_through_pyroute2():
    dest = DestSpec(ip("fd77:1::2").packed, 8080, 2, 9)
    msg = decode(codec.message(0x1F, messages.CMD_SET_DEST, 1, 1, codec.service_id(V4_SERVICE) + codec.dest_full(dest)))
    got = msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert {name: got.get_attr(name) for name, _ in got["attrs"]} == {
        "IPVS_DEST_ATTR_ADDR": dest.address, "IPVS_DEST_ATTR_PORT": 8080, "IPVS_DEST_ATTR_ADDR_FAMILY": 10,
        "IPVS_DEST_ATTR_FWD_METHOD": 2, "IPVS_DEST_ATTR_WEIGHT": 9, "IPVS_DEST_ATTR_U_THRESH": 0,
        "IPVS_DEST_ATTR_L_THRESH": 0}
    body = codec.service_id(V4_SERVICE) + codec.dest_id(dest)
    delete = decode(codec.message(0x1F, messages.CMD_DEL_DEST, 1, 1, body))
    assert [n for n, _ in delete.get_attr("IPVS_CMD_ATTR_DEST")["attrs"]] == [
        "IPVS_DEST_ATTR_ADDR", "IPVS_DEST_ATTR_PORT", "IPVS_DEST_ATTR_ADDR_FAMILY"]


def kernel_reply(nest: str, attrs: list) -> bytes:
    msg = messages.ipvsmsg()
    msg["cmd"] = 1
    msg["attrs"] = [[nest, {"attrs": attrs}]]
    msg["header"]["type"] = 0x1F
    msg.encode()
    return msg.data


STATS32 = [["IPVS_STATS_ATTR_CONNS", 5], ["IPVS_STATS_ATTR_INBYTES", 1 << 40], ["IPVS_STATS_ATTR_OUTPPS", 3]]
STATS64 = [["IPVS_STATS_ATTR_CONNS", 1 << 33], ["IPVS_STATS_ATTR_INBYTES", 1 << 41], ["IPVS_STATS_ATTR_OUTPPS", 4]]


def test_service_reply_parses_with_kernel_extras_ignored():
    data = kernel_reply("IPVS_CMD_ATTR_SERVICE", [
        ["IPVS_SVC_ATTR_AF", 10], ["IPVS_SVC_ATTR_PROTOCOL", 17], ["IPVS_SVC_ATTR_ADDR", V6_SERVICE.vip],
        ["IPVS_SVC_ATTR_PORT", 53], ["IPVS_SVC_ATTR_SCHED_NAME", "sh"], ["IPVS_SVC_ATTR_PE_NAME", "sip"],
        ["IPVS_SVC_ATTR_FLAGS", {"flags": 0x11 | 0x2, "mask": 0xFFFFFFFF}], ["IPVS_SVC_ATTR_TIMEOUT", 300],
        ["IPVS_SVC_ATTR_NETMASK", 128], ["IPVS_SVC_ATTR_STATS", {"attrs": STATS32}],
        ["IPVS_SVC_ATTR_STATS64", {"attrs": STATS64}]])
    (kind, seq, payload, end), = codec.split(data, len(data))
    assert codec.parse_service(data, payload, end).spec == V6_SERVICE
    assert codec.parse_service(data, payload, end, stats=True).stats == Stats(1 << 33, 0, 0, 1 << 41, 0, 0, 0, 4, 0, 0)


def test_service_reply_stats_fall_back_to_32_bit_nest():
    data = kernel_reply("IPVS_CMD_ATTR_SERVICE", [
        ["IPVS_SVC_ATTR_AF", 2], ["IPVS_SVC_ATTR_FWMARK", 7], ["IPVS_SVC_ATTR_SCHED_NAME", "rr"],
        ["IPVS_SVC_ATTR_FLAGS", {"flags": 0, "mask": 0xFFFFFFFF}], ["IPVS_SVC_ATTR_TIMEOUT", 0],
        ["IPVS_SVC_ATTR_NETMASK", 0xFFFFFFFF], ["IPVS_SVC_ATTR_STATS", {"attrs": STATS32}]])
    parsed = codec.parse_service(data, 16, len(data), stats=True)
    assert parsed.spec == FWMARK_SERVICE and parsed.spec.key == ("fwmark", 2, 7)
    assert parsed.stats == Stats(5, 0, 0, 1 << 40, 0, 0, 0, 3, 0, 0)


def test_dest_reply_parses_address_by_its_own_family():
    data = kernel_reply("IPVS_CMD_ATTR_DEST", [
        ["IPVS_DEST_ATTR_ADDR", ip("10.77.1.2").packed + bytes(12)], ["IPVS_DEST_ATTR_PORT", 8080],
        ["IPVS_DEST_ATTR_FWD_METHOD", 2 | 0x100], ["IPVS_DEST_ATTR_WEIGHT", 4], ["IPVS_DEST_ATTR_TUN_TYPE", 1],
        ["IPVS_DEST_ATTR_U_THRESH", 10], ["IPVS_DEST_ATTR_L_THRESH", 5], ["IPVS_DEST_ATTR_ACTIVE_CONNS", 3],
        ["IPVS_DEST_ATTR_INACT_CONNS", 2], ["IPVS_DEST_ATTR_PERSIST_CONNS", 1], ["IPVS_DEST_ATTR_ADDR_FAMILY", 2],
        ["IPVS_DEST_ATTR_STATS64", {"attrs": STATS64}]])
    dest = codec.parse_dest(data, 16, len(data), service_family=10, stats=True)
    assert dest.spec == DestSpec(ip("10.77.1.2").packed, 8080, 2, 4, 10, 5)
    assert (dest.active_conns, dest.inactive_conns, dest.persistent_conns) == (3, 2, 1)
    assert dest.stats.conns == 1 << 33
    assert codec.parse_dest(data, 16, len(data), service_family=10).stats is None


def test_split_walks_padded_messages_and_reads_errors():
    first = codec.message(0x1F, 1, 1, 5, b"\x05\x00\x01\x00\x07\x00\x00\x00")  # a 5-byte attribute, padded
    error = struct.pack("=IHHII", 36, codec.NLMSG_ERROR, 0, 6, 0) + struct.pack("=i", -17) + first[:16]
    data = first + error
    (k1, s1, _, _), (k2, s2, p2, _) = codec.split(data, len(data))
    assert (k1, s1, k2, s2) == (0x1F, 5, codec.NLMSG_ERROR, 6)
    assert codec.error_code(data, p2) == 17


def test_set_flags_changes_only_the_flags():
    msg = codec.message(0x1F, 1, codec.NLM_F_REQUEST, 9, codec.service_id(V4_SERVICE))
    acked = codec.set_flags(msg, codec.NLM_F_REQUEST | codec.NLM_F_ACK)
    assert struct.unpack_from("=IHHII", acked) == (len(msg), 0x1F, 5, 9, 0)
    assert acked[16:] == msg[16:] and codec.seq_of(acked) == 9


# --- malformed replies: an error, never a loop or a value read from the wrong bytes ------

def service_reply() -> bytes:
    return kernel_reply("IPVS_CMD_ATTR_SERVICE", [
        ["IPVS_SVC_ATTR_AF", 2], ["IPVS_SVC_ATTR_PROTOCOL", 6], ["IPVS_SVC_ATTR_ADDR", V4_SERVICE.vip + bytes(12)],
        ["IPVS_SVC_ATTR_PORT", 80], ["IPVS_SVC_ATTR_SCHED_NAME", "wlc"],
        ["IPVS_SVC_ATTR_FLAGS", {"flags": 0, "mask": 0xFFFFFFFF}], ["IPVS_SVC_ATTR_TIMEOUT", 0],
        ["IPVS_SVC_ATTR_NETMASK", 0xFFFFFFFF], ["IPVS_SVC_ATTR_STATS64", {"attrs": STATS64}]])


def dest_reply() -> bytes:
    return kernel_reply("IPVS_CMD_ATTR_DEST", [
        ["IPVS_DEST_ATTR_ADDR", ip("10.77.1.2").packed + bytes(12)], ["IPVS_DEST_ATTR_PORT", 8080],
        ["IPVS_DEST_ATTR_FWD_METHOD", 0], ["IPVS_DEST_ATTR_WEIGHT", 4], ["IPVS_DEST_ATTR_U_THRESH", 0],
        ["IPVS_DEST_ATTR_L_THRESH", 0], ["IPVS_DEST_ATTR_ACTIVE_CONNS", 3], ["IPVS_DEST_ATTR_INACT_CONNS", 2],
        ["IPVS_DEST_ATTR_PERSIST_CONNS", 1], ["IPVS_DEST_ATTR_ADDR_FAMILY", 2],
        ["IPVS_DEST_ATTR_STATS", {"attrs": STATS32}]])


def parse_all(data: bytes, length: int | None = None) -> list:
    """Everything the client would do with a received datagram; what parses, parsed."""
    out = []
    for kind, _, payload, end in codec.split(data, len(data) if length is None else length):
        if kind == codec.NLMSG_ERROR:
            out.append(codec.error_code(data, payload))
            continue
        for parse in (lambda: codec.parse_service(data, payload, end, stats=True),
                      lambda: codec.parse_dest(data, payload, end, 2, stats=True)):
            try:
                out.append(parse())
            except codec.MalformedReply:
                pass
    return out


def with_zero_length_attribute(data: bytes, at: int) -> bytes:
    """`data` with a 4-byte attribute header of length 0 inserted at offset `at`."""
    patched = data[:at] + struct.pack("=HH", 0, 1) + data[at:]
    return struct.pack("=I", len(patched)) + patched[4:]


def test_reference_replies_parse():
    assert codec.parse_service(service_reply(), 16, len(service_reply()), stats=True).spec == V4_SERVICE
    assert codec.parse_dest(dest_reply(), 16, len(dest_reply()), 2, stats=True).spec.weight == 4


def test_a_zero_length_attribute_before_the_nest_is_an_error_not_a_loop():
    data = with_zero_length_attribute(service_reply(), 20)  # first attribute after the genl header
    with pytest.raises(codec.MalformedReply, match="attribute of length 0"):
        codec.parse_service(data, 16, len(data))


def test_a_zero_length_attribute_inside_the_nest_is_an_error():
    data = dest_reply()
    data = with_zero_length_attribute(data, 24)  # first attribute inside the dest nest
    data = data[:20] + struct.pack("=H", struct.unpack_from("=H", data, 20)[0] + 4) + data[22:]  # nest grows
    with pytest.raises(codec.MalformedReply, match="attribute of length 0"):
        codec.parse_dest(data, 16, len(data), 2)


def test_an_attribute_running_past_its_nest_is_an_error():
    data = bytearray(dest_reply())
    struct.pack_into("=H", data, 24, 0xFFF0)  # the first dest attribute claims 64 KiB
    with pytest.raises(codec.MalformedReply, match="bytes left"):
        codec.parse_dest(bytes(data), 16, len(data), 2)


def test_a_truncated_message_is_an_error():
    data = service_reply()
    with pytest.raises(codec.MalformedReply, match="netlink message of length"):
        list(codec.split(data, len(data) - 8))
    short_error = struct.pack("=IHHII", 16, codec.NLMSG_ERROR, 0, 1, 0)
    with pytest.raises(codec.MalformedReply, match="error message"):
        list(codec.split(short_error, 16))


@pytest.mark.parametrize("name", ["IPVS_DEST_ATTR_WEIGHT", "IPVS_DEST_ATTR_PORT", "IPVS_DEST_ATTR_ADDR"])
def test_a_missing_or_short_required_attribute_is_an_error(name):
    attrs = [a for a in [["IPVS_DEST_ATTR_ADDR", ip("10.77.1.2").packed], ["IPVS_DEST_ATTR_PORT", 8080],
                         ["IPVS_DEST_ATTR_FWD_METHOD", 0], ["IPVS_DEST_ATTR_WEIGHT", 4],
                         ["IPVS_DEST_ATTR_U_THRESH", 0], ["IPVS_DEST_ATTR_L_THRESH", 0]] if a[0] != name]
    data = kernel_reply("IPVS_CMD_ATTR_DEST", attrs)
    with pytest.raises(codec.MalformedReply, match="destination attribute"):
        codec.parse_dest(data, 16, len(data), 2)
    # An IPv6 family with a 4-byte address: too short, not read from the next attribute.
    data = kernel_reply("IPVS_CMD_ATTR_DEST", [["IPVS_DEST_ATTR_ADDR", ip("10.77.1.2").packed],
                                               *attrs[1:], ["IPVS_DEST_ATTR_ADDR_FAMILY", 10]])
    with pytest.raises(codec.MalformedReply):
        codec.parse_dest(data, 16, len(data), 10)


def test_a_short_stats_counter_is_an_error():
    data = bytearray(service_reply())
    where = data.index(struct.pack("=HH", 12, messages.attr_numbers(messages.STATS_MAP)["IPVS_STATS_ATTR_CONNS"]))
    struct.pack_into("=H", data, where, 6)  # a u64 counter of 2 bytes
    with pytest.raises(codec.MalformedReply):
        codec.parse_service(bytes(data), 16, len(data), stats=True)


# --- fuzz: random and mutated bytes give a result or MalformedReply, fast -----------------

def bounded(data: bytes, length: int | None = None) -> None:
    started = time.monotonic()
    try:
        parse_all(data, length)
    except codec.MalformedReply:
        pass
    assert time.monotonic() - started < 0.5


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    bounded(data)


VALID = [service_reply(), dest_reply(), service_reply() + dest_reply(),
         struct.pack("=IHHII", 36, codec.NLMSG_ERROR, 0, 6, 0) + struct.pack("=i", -17) + bytes(16)]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=4)),
                                        max_size=6), st.integers(0, 400) | st.none())
def test_fuzz_mutated_replies(reply, edits, cut):
    """Valid replies with bytes overwritten (lengths, types, values) and truncated: the
    edits hit the length fields far more often than random bytes would."""
    data = bytearray(reply)
    for at, patch in edits:
        at %= len(data)
        data[at:at + len(patch)] = patch[:len(data) - at]
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    bounded(bytes(data))
    bounded(bytes(data) + bytes(64), len(data))  # stale bytes after the datagram are not read
