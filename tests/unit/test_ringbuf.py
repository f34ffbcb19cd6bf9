"""RingBuffer's reading of the kernel's ring layout, on a memfd laid out the same way (the
kernel maps the data area twice; here the writer writes it twice). The real ring buffer is
exercised by every tracer test in tests/kernel."""
import mmap
import os
import struct

import pytest

from ipvslb.tracer.ringbuf import BUSY_BIT, DISCARD_BIT, RingBuffer

PAGE = mmap.PAGESIZE
SIZE = PAGE  # one data page
RECORD = 24  # a slot is 32 bytes with its header


class FakeRing:
    def __init__(self):
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.mem = mmap.mmap(self.fd, 2 * PAGE + 2 * SIZE)
        self.producer = 0

    def consumer(self) -> int:
        return struct.unpack_from("<Q", self.mem, 0)[0]

    def set_positions(self, pos: int) -> None:
        struct.pack_into("<Q", self.mem, 0, pos)
        struct.pack_into("<Q", self.mem, PAGE, pos)
        self.producer = pos

    def _put(self, offset: int, data: bytes) -> None:
        for base in (2 * PAGE, 2 * PAGE + SIZE):  # the kernel's double mapping
            for i, byte in enumerate(data):
                self.mem[base + (offset + i) % SIZE] = byte

    def write(self, payload: bytes, flags: int = 0) -> int:
        """Reserves and fills a record; returns its position."""
        pos = self.producer
        self._put(pos % SIZE, struct.pack("<II", len(payload) | flags, 0) + payload)
        self.producer += (8 + len(payload) + 7) & ~7
        struct.pack_into("<Q", self.mem, PAGE, self.producer)
        return pos

    def commit(self, pos: int, length: int) -> None:
        self._put(pos % SIZE, struct.pack("<I", length))


@pytest.fixture
def ring():
    fake = FakeRing()
    reader = RingBuffer(fake.fd, SIZE, RECORD)
    yield fake, reader
    reader.close()
    fake.mem.close()
    os.close(fake.fd)


def payloads(runs: list[bytes]) -> list[bytes]:
    return [run[i + 8:i + 8 + RECORD] for run in runs for i in range(0, len(run), 32)]


def record(n: int) -> bytes:
    return bytes([n]) * RECORD


def test_committed_records_come_out_in_order_in_one_run_and_are_consumed(ring):
    fake, reader = ring
    for n in range(5):
        fake.write(record(n))
    runs = reader.drain()
    assert len(runs) == 1 and payloads(runs) == [record(n) for n in range(5)]
    assert fake.consumer() == fake.producer == 5 * 32
    assert reader.drain() == []


def test_a_record_still_being_written_holds_back_the_ones_behind_it(ring):
    fake, reader = ring
    fake.write(record(1))
    busy = fake.write(record(2), BUSY_BIT)
    fake.write(record(3))
    assert payloads(reader.drain()) == [record(1)]
    assert fake.consumer() == busy
    fake.commit(busy, RECORD)
    assert payloads(reader.drain()) == [record(2), record(3)]


def test_discarded_and_foreign_sized_records_are_stepped_over(ring):
    fake, reader = ring
    fake.write(record(1))
    fake.write(record(2), DISCARD_BIT)
    fake.write(b"odd size")
    fake.write(record(4))
    assert payloads(reader.drain()) == [record(1), record(4)]
    assert fake.consumer() == fake.producer


def test_a_run_across_the_end_of_the_data_area_is_contiguous(ring):
    fake, reader = ring
    fake.set_positions(10 * SIZE - 2 * 32)  # positions only grow; two slots before the end
    for n in range(4):
        fake.write(record(n))
    assert payloads(reader.drain()) == [record(n) for n in range(4)]
    assert fake.consumer() == 10 * SIZE + 2 * 32


def test_a_size_that_is_not_whole_pages_is_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        RingBuffer(-1, 3 * PAGE, RECORD)
