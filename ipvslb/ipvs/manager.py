"""Keeps the kernel's IPVS and the VIPs equal to the configured services.

`apply` plans the difference between the configured services and what the kernel holds,
and writes only that: never a flush, nothing for an unchanged state, nothing at all for
a service we do not own. What the kernel holds comes from a `Snapshot` (the last full
read, updated with every write since) while it is fresh, so an unchanged state costs no
netlink traffic at all; a full read ("verify": one service dump, one destination dump per
configured service) replaces it at the first apply, when it is older than
`ipvs_verify_interval`, after any error, and on request. `set_weight` is the health
layer's handle (`hold_weight` the same without a write, for the next apply); a weight it
lowered stays lowered across applies until it raises it back (or the backend leaves the
configuration). `drain` puts a backend at weight 0 over everything else until it is
undrained: health's weights are still remembered, and apply writes them again once the
drain ends. Drains are kept in the state directory (ipvslb.drains). Not thread-safe: the
daemon calls all of these from its one loop.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from ipvslb import model
from ipvslb.drains import Drains
from ipvslb.ipvs import reconcile, sysctls
from ipvslb.ipvs.client import IPVS, Failure
from ipvslb.ipvs.ownership import Ownership
from ipvslb.ipvs.snapshot import Snapshot
from ipvslb.ipvs.specs import DestSpec, Op, OpKind, ServiceSpec, dest_spec, service_spec
from ipvslb.ipvs.vips import VipInterface

log = logging.getLogger(__name__)



class ApplyResult(NamedTuple):
    """`ops` is the last plan made (after a snapshot proved wrong, the one made from the
    full read that followed); `writes` counts every netlink write, of all plans."""

    ops: list[Op]
    writes: int
    failures: list[Failure]


class ApplyError(RuntimeError):
    def __init__(self, result: ApplyResult):
        super().__init__(f"{len(result.failures)} of {len(result.ops)} IPVS changes failed: "
                         + "; ".join(str(f) for f in result.failures[:5]))
        self.result = result


class Manager:
    def __init__(self, settings: model.Settings, ipvs: IPVS | None = None, vips: VipInterface | None = None,
                 sysctl_root: Path = sysctls.PROC, clock: Callable[[], float] = time.monotonic):
        self.ipvs = IPVS() if ipvs is None else ipvs
        self.vips: VipInterface | None
        if settings.manage_vips:
            self.vips = VipInterface(settings.vip_interface) if vips is None else vips
        else:
            self.vips = None
        self.ownership = Ownership(settings.state_dir)
        self.drains = Drains(settings.state_dir)
        sysctls.apply(settings.sysctls, sysctl_root)
        self._services: dict[model.ServiceKey, model.Service] = {}
        self._services_given: Sequence[model.Service] | None = None  # what _services was made of
        self._overrides: dict[tuple[model.ServiceKey, model.Endpoint], int] = {}
        # id(service) -> (service, its spec, its destinations at configured weights).
        # The daemon passes the same frozen objects until a reload, and building 10 000
        # destination specs would be most of what an unchanged apply costs.
        self._specs: dict[int, tuple[model.Service, ServiceSpec, list[DestSpec]]] = {}
        # id(spec) -> (spec, destinations) of the last apply that succeeded: what the kernel
        # holds by the snapshot. While the snapshot is trusted, a reload plans only the
        # services that are not these same objects. Any other write forgets it.
        self._applied: dict[int, tuple[ServiceSpec, list[DestSpec]]] = {}
        self.verify_interval = settings.ipvs_verify_interval
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self.verifies = 0   # full reads of the kernel so far

    def close(self) -> None:
        self.ipvs.close()
        if self.vips is not None:
            self.vips.close()

    @property
    def writes(self) -> int:
        """Netlink writes so far, IPVS and rtnetlink together."""
        return self.ipvs.writes + (self.vips.writes if self.vips is not None else 0)

    def apply(self, services: Sequence[model.Service], verify: bool = False) -> ApplyResult:
        """Make the kernel match `services`; raises ApplyError (carrying the result) when
        some writes failed, after doing all the others. `verify` reads the kernel in full
        first instead of trusting the snapshot (on start and reload: someone may have
        changed it meanwhile)."""
        writes_before = self.writes
        # The same tuple again (the daemon's configuration): keys of addresses are slow to hash.
        if isinstance(services, tuple) and services is self._services_given:
            by_key = self._services
        else:
            by_key = {s.key: s for s in services}
            if len(by_key) != len(services):
                raise ValueError("two services with the same protocol, VIP and port")
        desired = self._desired(services, by_key)
        ops, failures, stale = self._reconcile(desired, verify)
        if stale:
            # A write planned from the snapshot failed, or found its goal already reached:
            # the snapshot was wrong, so the plan may be too. Once more from the kernel's
            # own account; its failures, if any, are the ones that count.
            ops, failures, _ = self._reconcile(desired, verify=True)

        self._services, self._services_given = by_key, services
        # Forget weights of backends that left the configuration, and those that merely
        # repeat the configured weight (they would hold back a later increase).
        if self._overrides:
            self._overrides = {k: w for k, w in self._overrides.items() if w < _configured_weight(by_key, *k)}
        if self.drains and not failures:
            self._forget_drains(services)
        result = ApplyResult(ops, self.writes - writes_before, failures)
        if failures:
            raise ApplyError(result)
        return result

    def _desired(self, services: Sequence[model.Service],
                 by_key: dict[model.ServiceKey, model.Service]) -> list[tuple[ServiceSpec, list[DestSpec]]]:
        """Every service with its destinations at the weights to write."""
        held = {id(by_key[key]) for key in {service for service, _ in self._overrides}
                | {service for service, _ in self.drains.drained} if key in by_key}
        specs, desired = {}, []
        for svc in services:
            cached = self._specs.get(id(svc))
            if cached is None or cached[0] is not svc:
                cached = (svc, service_spec(svc), [dest_spec(svc, b) for b in svc.backends])
            specs[id(svc)] = cached
            dests = cached[2]
            if id(svc) in held:
                dests = [dest_spec(svc, b, self._weight(svc, b)) for b in svc.backends]
            desired.append((cached[1], dests))
        self._specs = specs
        return desired

    def _reconcile(self, desired: list, verify: bool) -> tuple[list[Op], list[Failure], bool]:
        """One plan and its writes; the flag says the snapshot it trusted may be wrong."""
        wanted = frozenset(spec.key for spec, _ in desired)
        vips_wanted = frozenset(spec.vip for spec, _ in desired) if self.vips is not None else frozenset()
        owned_before = self.ownership.services
        state, self._snapshot = self._snapshot, None   # restored only if all goes well
        applied, self._applied = self._applied, {}     # likewise
        trusted = not verify and state is not None and self._clock() - state.taken < self.verify_interval \
            and state.knows(wanted)
        if not trusted or state is None:  # (trusted only with a snapshot)
            state = self._read(wanted)
            for key in sorted(wanted & state.services.keys() - owned_before, key=str):
                spec = state.services[key]
                log.warning("adopting IPVS service %s %s:%d, not created by ipvslb: it now follows the "
                            "configuration, and is deleted when it leaves it", spec.protocol,
                            ip_text(spec.vip), spec.port)
        already_done = self.ipvs.already_done
        # Only addresses we add are ours: one an administrator put there stays theirs.
        added = vips_wanted - state.vips
        # Claimed before they are created (one write for both), so that a crash in between
        # cannot leave a service or an address that is ours unrecorded.
        self.ownership.record(owned_before | wanted, self.ownership.vips | added)
        if added:
            assert self.vips is not None  # VIPs are wanted only when they are managed
            for vip in added:
                self.vips.add(vip)
                state.vips.add(vip)

        ops = reconcile.plan(desired, state.services, state.dests, self.ownership.services,
                             applied if trusted else None)
        failures = self.ipvs.execute(ops)

        # A service we failed to delete stays ours. A VIP of ours stays while any IPVS
        # service (ours or not) still uses it: removing it would cut that service off.
        kept = {f.op.service for f in failures if f.op.kind is OpKind.DELETE_SERVICE}
        vips_kept = self.ownership.vips
        if self.vips is not None:
            deleted = {op.service.key for op in ops if op.kind is OpKind.DELETE_SERVICE} - {spec.key for spec in kept}
            in_use = vips_wanted | {spec.vip for key, spec in state.services.items() if key not in deleted}
            vips_kept = self.ownership.vips & in_use
            for vip in (self.ownership.vips - in_use) & state.vips:
                self.vips.remove(vip)
                state.vips.discard(vip)
        self.ownership.record(wanted | {spec.key for spec in kept}, vips_kept)
        if failures:
            return ops, failures, trusted   # the snapshot stays dropped: the next apply verifies
        if trusted and self.ipvs.already_done != already_done:
            return ops, failures, True
        state.record(ops)
        self._snapshot = state
        self._applied = {id(spec): (spec, dests) for spec, dests in desired}
        return ops, failures, False

    def _read(self, wanted: frozenset) -> Snapshot:
        """The kernel's state, read in full: all services, the destinations of the
        configured ones, the VIP interface's addresses (created if missing)."""
        self.verifies += 1
        taken = self._clock()
        services = {ks.spec.key: ks.spec for ks in self.ipvs.services()}
        dests = {key: {d.spec.key: d.spec for d in self.ipvs.dests(spec)}
                 for key, spec in services.items() if key in wanted}
        vips: set[bytes] = set()
        if self.vips is not None:
            self.vips.ensure()
            vips = self.vips.addresses()
        return Snapshot(taken, services, dests, vips)

    def hold_weight(self, service: model.ServiceKey, backend: model.Endpoint, weight: int | None) -> None:
        """Remember the weight the health layer wants without writing it: the next apply
        writes it (or nothing, if the kernel has it already). A weight at or above the
        configured one, or None, gives the backend back to the configuration."""
        if weight is None:
            self._overrides.pop((service, backend), None)
        else:
            self._overrides[(service, backend)] = weight

    def set_weight(self, service: model.ServiceKey, backend: model.Endpoint, weight: int | None) -> int:
        """hold_weight, and write the resulting weight now (one write). Returns it."""
        svc = self._services[service]
        configured = _configured(svc, backend)
        if configured is None:
            raise KeyError(backend)
        self.hold_weight(service, backend, None if weight is None or weight >= configured.weight else weight)
        return self._write_weight(svc, configured)

    def _write_weight(self, svc: model.Service, configured: model.Backend) -> int:
        effective = self._weight(svc, configured)
        op = Op(OpKind.EDIT_DEST, service_spec(svc), dest_spec(svc, configured, effective))
        state, self._snapshot = self._snapshot, None
        self._applied = {}  # the kernel now holds a weight no apply planned
        self.ipvs.apply_one(op)
        if state is not None and op.service.key in state.dests:
            state.record([op])
            self._snapshot = state
        return effective

    def drain(self, service: model.ServiceKey, backend: model.Endpoint, drained: bool) -> int:
        """Drain the backend (weight 0 until undrained) or undrain it (the weight health
        wants), recorded in the state directory first, then written (one write). Returns
        the weight written. KeyError when the service or backend is not configured,
        OSError when the record or the write fails."""
        svc = self._services[service]
        configured = _configured(svc, backend)
        if configured is None:
            raise KeyError(backend)
        key = (service, backend)
        self.drains.record(self.drains.drained | {key} if drained else self.drains.drained - {key})
        return self._write_weight(svc, configured)

    def _forget_drains(self, services: Sequence[model.Service]) -> None:
        """Drains of backends that left the configuration end with them: one that came
        back later would otherwise start drained, long after anyone remembered why."""
        configured = {(s.key, b.key) for s in services for b in s.backends}
        gone = self.drains.drained - configured
        if not gone:
            return
        try:
            self.drains.record(self.drains.drained & configured)
        except OSError as err:
            log.error("cannot update %s: %s", self.drains.path, err)
            return
        for (proto, vip, port), backend in sorted(gone, key=str):
            log.warning("drain of %s in %s %s ended: the backend left the configuration",
                        model.format_endpoint(backend), proto, model.format_endpoint((vip, port)))

    def _weight(self, service: model.Service, backend: model.Backend) -> int:
        if self.drains and (service.key, backend.key) in self.drains:
            return 0
        if not self._overrides:  # the common case; keys of addresses are slow to hash
            return backend.weight
        override = self._overrides.get((service.key, backend.key))
        return backend.weight if override is None else min(backend.weight, override)


def _configured(svc: model.Service, backend: model.Endpoint) -> model.Backend | None:
    return next((b for b in svc.backends if b.key == backend), None)


def _configured_weight(services: dict[model.ServiceKey, model.Service], service: model.ServiceKey,
                       backend: model.Endpoint) -> int:
    """The backend's configured weight; -1 when it is not configured. (Looked up per held
    weight, not through a table of every backend: keys of addresses are slow to hash.)"""
    svc = services.get(service)
    configured = _configured(svc, backend) if svc is not None else None
    return configured.weight if configured is not None else -1


def ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))
