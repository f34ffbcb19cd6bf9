"""The reader's side of the successes the tracer counts instead of reporting.

The kernel counts, per (VIP, backend) pair, the connects it did not time, in a slot of the
`pair_counts` array; `pair_slots` says which slot is whose. The reader hands out the slots:
a pair gets one when a timed connect to it shows up in the records, and loses it when its
service is no longer traced. The counts are read through the array's memory mapping, with
no system call (docs/decisions/sampled-connects.md has the alternatives, measured).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from ipvslb.tracer import records

WORDS_PER_SLOT = records.PAIR_STATS.size // 8  # last_timed_ns, counted, last_counted_ns
Pair = tuple[str, records.Endpoint, records.Endpoint]  # protocol, VIP, backend


class SlotMap(Protocol):
    """The kernel's `pair_slots` map: struct pair bytes -> slot number."""

    def __setitem__(self, key: bytes, slot: int) -> None: ...

    def __delitem__(self, key: bytes) -> None: ...


class PairCounts:
    """`slots` is the kernel's `pair_slots` map, `counts` the mapped `pair_counts` array of
    `capacity` slots of struct pair_stats."""

    def __init__(self, slots: SlotMap, counts: memoryview, capacity: int):
        if len(counts) < capacity * records.PAIR_STATS.size:
            raise ValueError(f"{len(counts)} bytes cannot hold {capacity} pair slots")
        self._kernel_slots = slots
        # Aligned 8-byte loads and stores: the kernel updates these words while they are read.
        self._words = counts.cast("Q")
        self._slots: dict[Pair, int] = {}
        self._never_used = iter(range(capacity))
        # Freed slots are handed out again only once no slot was never used, so that a
        # kernel program that found a slot just before it was freed cannot count for the
        # pair that gets it next.
        self._freed: deque[int] = deque()

    def learn(self, batch: Iterable[records.ConnEvent]) -> None:
        """Give a slot to every TCP pair a timed connect in `batch` went to that has none.
        With all slots taken, the pairs without one keep having every connect timed."""
        for event in batch:
            if event.kind is records.Kind.CONNECT and event.backend and event.protocol == "tcp":
                pair = (event.protocol, event.vip, event.backend)
                if pair not in self._slots:
                    self._assign(pair)

    def _assign(self, pair: Pair) -> None:
        slot = next(self._never_used, None)
        if slot is None:
            if not self._freed:
                return
            slot = self._freed.popleft()
        base = slot * WORDS_PER_SLOT
        self._words[base:base + WORDS_PER_SLOT] = memoryview(bytes(records.PAIR_STATS.size)).cast("Q")
        self._kernel_slots[records.pair_key(*pair)] = slot
        self._slots[pair] = slot

    def forget(self, keep: Callable[[str, records.Endpoint], bool]) -> None:
        """Free the slots of the pairs whose (protocol, VIP) `keep` refuses."""
        for pair in [p for p in self._slots if not keep(p[0], p[1])]:
            del self._kernel_slots[records.pair_key(*pair)]
            self._freed.append(self._slots.pop(pair))

    def read(self) -> list[records.Counted]:
        """Every pair with a slot, with its count so far (counts only grow while the pair
        keeps its slot) and when the last one established."""
        words = self._words
        return [records.Counted(protocol, vip, backend, words[slot * WORDS_PER_SLOT + 1],
                               words[slot * WORDS_PER_SLOT + 2] / 1e9)
                for (protocol, vip, backend), slot in self._slots.items()]

    def release(self) -> None:
        self._words.release()
