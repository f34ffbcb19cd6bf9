"""The reader's slots for counted successes, against a dict for the kernel's pair -> slot map
and a bytearray for the mapped counts array."""
import ipaddress

import pytest

from ipvslb.tracer import records
from ipvslb.tracer.paircounts import PairCounts

VIP = (ipaddress.ip_address("10.90.0.1"), 80)
VIP6 = (ipaddress.ip_address("fd90::1"), 80)


def backend(n):
    return (ipaddress.ip_address(f"10.77.0.{n}"), 8080)


def connect(vip, backend_, kind=records.Kind.CONNECT, protocol="tcp"):
    return records.ConnEvent(kind, 1.0, 1, protocol, (ipaddress.ip_address("10.0.0.1"), 40000), vip, backend_)


class Kernel:
    """What the BPF side does with a slot: count a success in it."""

    def __init__(self, capacity):
        self.slots: dict[bytes, int] = {}
        self.counts = bytearray(capacity * records.PAIR_STATS.size)

    def count(self, vip, backend_, n=1, ts_ns=0):
        slot = self.slots.get(records.pair_key("tcp", vip, backend_))
        if slot is None:
            return False
        offset = slot * records.PAIR_STATS.size
        last_timed, count, _ = records.PAIR_STATS.unpack_from(self.counts, offset)
        records.PAIR_STATS.pack_into(self.counts, offset, last_timed, count + n, ts_ns)
        return True


def reader(capacity=8):
    kernel = Kernel(capacity)
    return kernel, PairCounts(kernel.slots, memoryview(kernel.counts), capacity)


def test_a_timed_connect_gives_its_pair_a_slot_and_the_counts_are_read_from_it():
    kernel, pairs = reader()
    assert not kernel.count(VIP, backend(1))  # no slot yet: the kernel times every connect
    pairs.learn([connect(VIP, backend(1)), connect(VIP, backend(1)), connect(VIP6, backend(2))])
    assert len(kernel.slots) == 2
    assert kernel.count(VIP, backend(1), 5, ts_ns=2_500_000_000)
    read = {(c.vip, c.backend): c for c in pairs.read()}
    assert read[(VIP, backend(1))] == records.Counted("tcp", VIP, backend(1), 5, 2.5)
    assert read[(VIP6, backend(2))].connects == 0


def test_only_tcp_connects_with_a_backend_get_a_slot():
    kernel, pairs = reader()
    pairs.learn([connect(VIP, None), connect(VIP, backend(1), protocol="udp"),
                 connect(VIP, backend(1), kind=records.Kind.ESTABLISHED),
                 connect(VIP, backend(1), kind=records.Kind.BACKEND)])
    assert kernel.slots == {} and pairs.read() == []


def test_forgotten_services_free_their_slots_and_a_reused_slot_starts_from_zero():
    kernel, pairs = reader(capacity=2)
    pairs.learn([connect(VIP, backend(1)), connect(VIP6, backend(2))])
    kernel.count(VIP, backend(1), 7)
    pairs.learn([connect(VIP, backend(3))])  # full: stays timed
    assert records.pair_key("tcp", VIP, backend(3)) not in kernel.slots
    pairs.forget(lambda protocol, vip: vip == VIP6)
    assert list(kernel.slots) == [records.pair_key("tcp", VIP6, backend(2))]
    assert [c.backend for c in pairs.read()] == [backend(2)]
    pairs.learn([connect(VIP, backend(3))])
    assert kernel.count(VIP, backend(3), 1)
    assert {c.backend: c.connects for c in pairs.read()} == {backend(2): 0, backend(3): 1}


def test_a_freed_slot_is_reused_only_when_no_slot_was_never_used():
    kernel, pairs = reader(capacity=3)
    pairs.learn([connect(VIP, backend(1))])
    first = kernel.slots[records.pair_key("tcp", VIP, backend(1))]
    pairs.forget(lambda protocol, vip: False)
    pairs.learn([connect(VIP, backend(2)), connect(VIP, backend(3)), connect(VIP, backend(4))])
    taken = {backend(n): kernel.slots.get(records.pair_key("tcp", VIP, backend(n))) for n in (2, 3, 4)}
    assert first not in (taken[backend(2)], taken[backend(3)])
    assert taken[backend(4)] == first


def test_counts_too_small_for_the_capacity_are_refused():
    with pytest.raises(ValueError, match="cannot hold 4 pair slots"):
        PairCounts({}, memoryview(bytearray(3 * records.PAIR_STATS.size)), 4)
