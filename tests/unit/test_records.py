import ipaddress

import pytest

from ipvslb.tracer import conntable, records
from ipvslb.tracer.records import Kind


def record(kind, family=2, caddr=b"\x0a\x5a\x00\x01", baddr=b"\x0a\x4d\x01\x02", bfamily=2, protocol=6,
           icmp_code=0):
    """One record as it sits in the ring buffer: 8-byte header (length, page offset), then the record."""
    header = records.RECORD.size.to_bytes(4, "little") + bytes(4)
    return header + records.RECORD.pack(1_500_000_000, 0xFFFF0001, 250_000_000, caddr.ljust(16, b"\0"),
                                        caddr.ljust(16, b"\0"), baddr.ljust(16, b"\0"), 40000, 80, 8080, 1,
                                        kind, family, protocol, bfamily, icmp_code)


def test_decode_reads_every_field_of_an_ipv4_record():
    [e] = records.decode_slots(record(Kind.SYN_RETRANSMIT))
    assert e.kind is Kind.SYN_RETRANSMIT
    assert e.ts == 1.5 and e.elapsed == 0.25 and e.sock == 0xFFFF0001
    assert e.client == (ipaddress.ip_address("10.90.0.1"), 40000)
    assert e.vip == (ipaddress.ip_address("10.90.0.1"), 80)
    assert e.backend == (ipaddress.ip_address("10.77.1.2"), 8080)
    assert e.protocol == "tcp" and e.retransmits == 1


def test_decode_ipv6_and_missing_backend():
    v6 = ipaddress.ip_address("fd90::1").packed
    [e] = records.decode_slots(record(Kind.CONNECT, family=10, caddr=v6, baddr=b"", bfamily=0))
    assert e.client[0] == ipaddress.ip_address("fd90::1")
    assert e.backend is None
    assert "via ?" in str(e)


def test_an_untimed_establishment_prints_when_it_was_seen_not_a_connect_time():
    [e] = records.decode_slots(record(Kind.ESTABLISHED_UNTIMED))
    assert e.kind.label == "established-untimed"
    line = str(e)
    assert "established-untimed" in line and "seen-after=250.0ms" in line and " after=" not in line


def test_an_unreachable_record_carries_its_icmp_code_and_names_it_per_family():
    [e] = records.decode_slots(record(Kind.UNREACHABLE, protocol=17, icmp_code=3))
    assert e.kind is Kind.UNREACHABLE and e.protocol == "udp" and e.icmp_code == 3
    assert e.backend == (ipaddress.ip_address("10.77.1.2"), 8080)
    assert "unreachable" in str(e) and "icmp=ICMP port unreachable" in str(e)
    v6 = ipaddress.ip_address("fd77:1::2").packed
    [e6] = records.decode_slots(record(Kind.UNREACHABLE, family=10, caddr=v6, baddr=v6, bfamily=10, protocol=17,
                                      icmp_code=4))
    assert records.unreachable_reason(e6) == "ICMPv6 port unreachable"
    [odd] = records.decode_slots(record(Kind.UNREACHABLE, protocol=17, icmp_code=200))
    assert records.unreachable_reason(odd) == "ICMP unreachable code 200"


def test_a_record_of_a_kind_the_decoder_does_not_know_is_refused():
    with pytest.raises(ValueError):
        records.decode_slots(record(42))


def test_consecutive_slots_decode_in_order_and_share_address_objects():
    v6 = ipaddress.ip_address("fd90::1").packed
    kinds = [Kind.CONNECT, Kind.ESTABLISHED, Kind.RESET]
    decoded = records.decode_slots(record(kinds[0]) + record(kinds[1])
                                   + record(kinds[2], family=10, caddr=v6, bfamily=0))
    assert [e.kind for e in decoded] == kinds
    assert decoded[2].client[0] == ipaddress.ip_address("fd90::1") and decoded[2].backend is None
    assert decoded[0].client[0] is decoded[1].client[0]


def test_a_record_with_an_unknown_protocol_takes_the_checked_path():
    slot = bytearray(record(Kind.CONNECT))
    slot[8 + records.RECORD.size - 6] = 132  # protocol: SCTP
    assert records.decode_slots(bytes(slot))[0].protocol == "132"


def test_vip_key_matches_the_bpf_struct_layout():
    key = records.vip_key("udp", ipaddress.ip_address("10.0.0.1"), 53)
    assert key == bytes([10, 0, 0, 1]) + b"\0" * 12 + (53).to_bytes(2, "little") + bytes([17, 2])


def test_pair_key_is_struct_pair_for_both_families():
    v, b = ipaddress.ip_address("10.90.0.1"), ipaddress.ip_address("fd77::2")
    key = records.pair_key("tcp", (v, 80), (b, 8080))
    assert records.PAIR.size == 40 and records.PAIR_STATS.size == 24
    assert key == (bytes([10, 90, 0, 1]) + b"\0" * 12 + b.packed + (80).to_bytes(2, "little")
                   + (8080).to_bytes(2, "little") + bytes([2, 10, 6, 0]))


def counted(count, backend="10.77.0.1"):
    return records.Counted("tcp", (ipaddress.ip_address("10.90.0.1"), 80), (ipaddress.ip_address(backend), 8080),
                          count, float(count))


def test_counted_since_returns_only_what_is_new_per_pair():
    since = records.CountedSince()
    assert [n for _, n in since.new([counted(5), counted(2, "10.77.0.2")])] == [5, 2]
    assert [(c.backend[0].exploded, n) for c, n in since.new([counted(5), counted(9, "10.77.0.2")])] == [
        ("10.77.0.2", 7)]
    assert since.new([counted(5)]) == []


def test_counted_since_a_pair_that_restarted_from_zero_counts_in_full():
    since = records.CountedSince()
    since.new([counted(50)])
    assert [n for _, n in since.new([counted(3)])] == [3]


def test_conntable_parses_ipv4_and_ipv6_rows():
    text = (
        "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
        "TCP 0A5A0001 9C40 0A5A0001 0050 0A4D0102 1F90 SYN_SENT         57\n"
        "TCP fd90:0000:0000:0000:0000:0000:0000:0001 9C41 fd90:0000:0000:0000:0000:0000:0000:0001 0050 "
        "[fd77:0001:0000:0000:0000:0000:0000:0002] 1F90 ESTABLISHED     899\n"
    )
    table = conntable.parse(text)
    v4 = ipaddress.ip_address("10.90.0.1")
    assert table[("tcp", (v4, 40000), (v4, 80))] == (ipaddress.ip_address("10.77.1.2"), 8080)
    v6 = ipaddress.ip_address("fd90::1")
    assert table[("tcp", (v6, 40001), (v6, 80))] == (ipaddress.ip_address("fd77:1::2"), 8080)


@pytest.mark.parametrize("vip,backend", [(("10.0.0.1", 53), ("10.0.1.2", 5353)),
                                         (("fd00::1", 53), ("fd00:1::2", 53)),
                                         (("fd00::1", 53), ("10.0.1.2", 53))])
def test_a_pair_key_decodes_back_to_its_vip_and_backend(vip, backend):
    vip = (ipaddress.ip_address(vip[0]), vip[1])
    backend = (ipaddress.ip_address(backend[0]), backend[1])
    assert records.decode_pair(records.pair_key("udp", vip, backend)) == ("udp", vip, backend)
