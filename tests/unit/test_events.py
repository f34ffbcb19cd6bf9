import ipaddress

from ipvslb import conntable, events
from ipvslb.events import Kind


def record(kind, family=2, caddr=b"\x0a\x5a\x00\x01", baddr=b"\x0a\x4d\x01\x02", bfamily=2):
    return events.RECORD.pack(1_500_000_000, 0xFFFF0001, 250_000_000, caddr.ljust(16, b"\0"),
                              caddr.ljust(16, b"\0"), baddr.ljust(16, b"\0"), 40000, 80, 8080, 1,
                              kind, family, 6, bfamily, 0)


def test_decode_reads_every_field_of_an_ipv4_record():
    e = events.decode(record(Kind.SYN_RETRANSMIT))
    assert e.kind is Kind.SYN_RETRANSMIT
    assert e.ts == 1.5 and e.elapsed == 0.25 and e.sock == 0xFFFF0001
    assert e.client == (ipaddress.ip_address("10.90.0.1"), 40000)
    assert e.vip == (ipaddress.ip_address("10.90.0.1"), 80)
    assert e.backend == (ipaddress.ip_address("10.77.1.2"), 8080)
    assert e.protocol == "tcp" and e.retransmits == 1


def test_decode_ipv6_and_missing_backend():
    v6 = ipaddress.ip_address("fd90::1").packed
    e = events.decode(record(Kind.CONNECT, family=10, caddr=v6, baddr=b"", bfamily=0))
    assert e.client[0] == ipaddress.ip_address("fd90::1")
    assert e.backend is None
    assert "via ?" in str(e)


def test_ring_slots_decode_like_single_records_and_addresses_are_shared():
    v6 = ipaddress.ip_address("fd90::1").packed
    raw = [record(Kind.CONNECT), record(Kind.ESTABLISHED), record(Kind.RESET, family=10, caddr=v6, bfamily=0)]
    slots = b"".join(len(r).to_bytes(4, "little") + bytes(4) + r for r in raw)
    decoded = events.decode_slots(slots)
    assert decoded == [events.decode(r) for r in raw]
    assert decoded[0].client[0] is decoded[1].client[0]


def test_a_record_with_an_unknown_protocol_takes_the_checked_path():
    raw = bytearray(record(Kind.CONNECT))
    raw[events.RECORD.size - 6] = 132  # protocol: SCTP
    slot = len(raw).to_bytes(4, "little") + bytes(4) + bytes(raw)
    assert events.decode_slots(slot)[0].protocol == "132"


def test_vip_key_matches_the_bpf_struct_layout():
    key = events.vip_key("udp", ipaddress.ip_address("10.0.0.1"), 53)
    assert key == bytes([10, 0, 0, 1]) + b"\0" * 12 + (53).to_bytes(2, "little") + bytes([17, 2])


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
