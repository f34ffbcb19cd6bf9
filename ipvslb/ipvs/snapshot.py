"""What the manager last saw in the kernel, kept up to date with its own writes.

Reading IPVS back costs one dump per service (1000 services: over a second in the test
VM), while the only writer of our services is, normally, us. So the manager plans from
this record and reads the kernel only to verify it: at the first apply, when the record
is older than `ipvs_verify_interval`, when asked, and after anything went wrong. Someone
else's change to our services is repaired at the next verify, not at once.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ipvslb.ipvs.specs import DestSpec, Op, OpKind, ServiceSpec


@dataclass
class Snapshot:
    """`services`: every service in the kernel by key, ours or not; `dests`: the
    destinations by key of those services whose destinations we know (read, or created
    by us); `vips`: the addresses on the VIP interface; `taken`: monotonic time of the
    dump it started from."""

    taken: float
    services: dict[tuple, ServiceSpec]
    dests: dict[tuple, dict[tuple, DestSpec]] = field(default_factory=dict)
    vips: set[bytes] = field(default_factory=set)

    def knows(self, keys: Iterable[tuple]) -> bool:
        """Whether the destinations of every one of `keys` that exists are known, which
        is what planning for those services needs."""
        return all(key in self.dests or key not in self.services for key in keys)

    def record(self, ops: Iterable[Op]) -> None:
        """Apply writes the kernel accepted."""
        for op in ops:
            key = op.service.key
            if op.kind in (OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE):
                self.services[key] = op.service
                self.dests.setdefault(key, {})
            elif op.kind is OpKind.DELETE_SERVICE:
                self.services.pop(key, None)
                self.dests.pop(key, None)
            elif op.dest is None:
                raise ValueError(f"{op.kind.value} without a destination")
            elif op.kind is OpKind.DELETE_DEST:
                self.dests.get(key, {}).pop(op.dest.key, None)
            else:
                self.dests.setdefault(key, {})[op.dest.key] = op.dest
