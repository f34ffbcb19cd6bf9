"""The difference between the desired IPVS state and the kernel's, as a list of writes.

Pure: no sockets, no files. Only services that are desired or owned are looked at, so a
service someone else created can never appear in a plan. Within a service, additions
and edits come before deletions, so that a service whose backends are all replaced
always has somewhere to send new connections; whole services are removed last.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from ipvslb.ipvs.specs import DestSpec, Op, OpKind, ServiceSpec


def plan(desired: Sequence[tuple[ServiceSpec, Sequence[DestSpec]]],
         kernel: Mapping[tuple, ServiceSpec],
         kernel_dests: Mapping[tuple, Mapping[tuple, DestSpec]],
         owned: AbstractSet[tuple],
         known: Mapping[int, tuple[ServiceSpec, Sequence[DestSpec]]] | None = None) -> list[Op]:
    """desired: every configured service with its destinations (weights already final);
    kernel: every service in the kernel by key; kernel_dests: the destinations by key of
    the desired services that exist in the kernel; owned: keys of services we may delete;
    known: by id of the spec, (spec, destinations) the kernel is known to hold already,
    skipped when they come again as the very same objects."""
    ops: list[Op] = []
    wanted = set()
    known = known or {}
    for service, dests in desired:
        key = service.key
        wanted.add(key)
        same = known.get(id(service))
        if same is not None and same[0] is service and same[1] is dests:
            continue
        current = kernel.get(key)
        if current is None:
            ops.append(Op(OpKind.ADD_SERVICE, service))
            ops.extend(Op(OpKind.ADD_DEST, service, d) for d in dests)
            continue
        if current != service:
            ops.append(Op(OpKind.EDIT_SERVICE, service))
        ops.extend(_dest_ops(service, dests, kernel_dests.get(key, {})))
    ops.extend(Op(OpKind.DELETE_SERVICE, spec) for key, spec in kernel.items() if key in owned and key not in wanted)
    return ops


def _dest_ops(service: ServiceSpec, dests: Sequence[DestSpec], current: Mapping[tuple, DestSpec]) -> list[Op]:
    # The common case, unchanged, compared without a Python-level step per destination:
    # that is most of what a no-op apply of 10 000 destinations costs.
    if len(dests) == len(current) and set(dests) == set(current.values()):
        return []
    ops = []
    found = 0
    for dest in dests:
        have = current.get(dest.key)
        if have is None:
            ops.append(Op(OpKind.ADD_DEST, service, dest))
        else:
            found += 1
            if have != dest:
                ops.append(Op(OpKind.EDIT_DEST, service, dest))
    # Every current destination was matched (keys are unique): the common, unchanged case
    # needs no set of the desired keys.
    if found < len(current):
        keep = {dest.key for dest in dests}
        ops.extend(Op(OpKind.DELETE_DEST, service, d) for key, d in current.items() if key not in keep)
    return ops
