"""Reads a BPF ring buffer through its memory mapping, many records per call.

bcc (like libbpf) hands records over one at a time, through a ctypes callback. At thousands
of connects per second that callback was a large part of the daemon's CPU: in one VM run,
connects went at 66 % of the untraced rate with it and at 81 % reading the mapping. So the
tracer reads the ring itself. The kernel's layout (kernel/bpf/ringbuf.c, stable since 5.8)
is one page with the consumer position, which the reader writes, then one page with the
producer position, then the data area mapped twice in a row, so that a run of records never wraps.

Each record sits behind an 8-byte header whose first word is its length, with a busy bit
while the producer is still writing it and a discard bit if it was thrown away. All records
here have one size, so a run of committed ones is handed out as a single bytes object that
the caller unpacks at C speed (struct.iter_unpack).
"""
from __future__ import annotations

import ctypes
import mmap

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8


class RingBuffer:
    """The consumer side of one BPF_MAP_TYPE_RINGBUF map of `data_size` bytes (a power of
    two number of pages) holding records of exactly `record_size` bytes."""

    def __init__(self, map_fd: int, data_size: int, record_size: int):
        page = mmap.PAGESIZE
        if data_size <= 0 or data_size % page or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power-of-two number of pages")
        self.slot = (HEADER_SIZE + record_size + 7) & ~7
        self._length = record_size
        self._mask = data_size - 1
        self._page = page
        self._consumer_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._data_map = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        # Aligned 8- and 4-byte loads and stores through typed views: the positions and
        # headers are shared with the kernel and must never be read or written byte by byte.
        self._consumer_pos = ctypes.c_uint64.from_buffer(self._consumer_map)
        self._words64 = memoryview(self._data_map).cast("Q")
        self._words32 = memoryview(self._data_map).cast("I")

    def drain(self) -> list[bytes]:
        """Every committed record not read yet, as runs of whole slots (header + record)."""
        runs: list[bytes] = []
        consumer = self._consumer_pos.value
        producer = self._words64[0]
        while consumer < producer:
            start = self._page + (consumer & self._mask)
            count = (producer - consumer) // self.slot
            stride = self.slot // 4
            headers = self._words32[start // 4:start // 4 + count * stride:stride].tolist()
            # All records have our length unless one is busy or foreign: count at C speed.
            whole = count if headers.count(self._length) == count else \
                next(i for i, h in enumerate(headers) if h != self._length)
            if whole:
                # Read after the headers: a committed header means its record is complete.
                runs.append(self._data_map[start:start + whole * self.slot])
                consumer += whole * self.slot
            if whole < count or not whole:
                header = self._words32[(self._page + (consumer & self._mask)) // 4]
                if header & BUSY_BIT:
                    break  # still being written; records behind it wait for the next drain
                if header & DISCARD_BIT or (header & ~DISCARD_BIT) != self._length:
                    # Not one of ours to decode: step over it by its own length.
                    consumer += (HEADER_SIZE + (header & ~(BUSY_BIT | DISCARD_BIT)) + 7) & ~7
        # Released only after the copies above: the kernel may reuse the space at once.
        self._consumer_pos.value = consumer
        return runs

    def close(self) -> None:
        self._words64.release()
        self._words32.release()
        del self._consumer_pos
        self._consumer_map.close()
        self._data_map.close()
