"""Keeps the kernel's IPVS and the VIPs equal to the configured services.

`apply` reads the kernel (one dump of all services, one destination dump per configured
service that exists), plans the difference and writes only that: never a flush, nothing
for an unchanged state, nothing at all for a service we do not own. `set_weight` is the
health layer's handle (`hold_weight` the same without a write, for the next apply); a
weight it lowered stays lowered across applies until it raises it back (or the backend
leaves the configuration). Not thread-safe: the daemon calls both
from its one loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from ipvslb import model
from ipvslb.ipvs import reconcile, sysctls
from ipvslb.ipvs.client import IPVS, Failure
from ipvslb.ipvs.ownership import Ownership
from ipvslb.ipvs.specs import Op, dest_spec, service_spec
from ipvslb.ipvs.vips import VipInterface

ServiceKey = tuple[str, model.IPAddress, int]
BackendKey = tuple[model.IPAddress, int]


class ApplyResult(NamedTuple):
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
                 sysctl_root: Path = sysctls.PROC):
        self.ipvs = IPVS() if ipvs is None else ipvs
        if settings.manage_vips:
            self.vips = VipInterface(settings.vip_interface) if vips is None else vips
        else:
            self.vips = None
        self.ownership = Ownership(settings.state_dir)
        sysctls.apply(settings.sysctls, sysctl_root)
        self._services: dict[ServiceKey, model.Service] = {}
        self._overrides: dict[tuple[ServiceKey, BackendKey], int] = {}

    def close(self) -> None:
        self.ipvs.close()
        if self.vips is not None:
            self.vips.close()

    @property
    def writes(self) -> int:
        """Netlink writes so far, IPVS and rtnetlink together."""
        return self.ipvs.writes + (self.vips.writes if self.vips is not None else 0)

    def apply(self, services: Sequence[model.Service]) -> ApplyResult:
        """Make the kernel match `services`; raises ApplyError (carrying the result) when
        some writes failed, after doing all the others."""
        writes_before = self.writes
        by_key = {s.key: s for s in services}
        if len(by_key) != len(services):
            raise ValueError("two services with the same protocol, VIP and port")
        desired = [(service_spec(s), [dest_spec(s, b, self._weight(s, b)) for b in s.backends]) for s in services]
        wanted = frozenset(spec.key for spec, _ in desired)
        kernel = {ks.spec.key: ks.spec for ks in self.ipvs.services()}

        vips_wanted = frozenset(spec.vip for spec, _ in desired) if self.vips is not None else frozenset()
        # Claim before creating, so that a crash in between cannot leave an unowned service.
        self.ownership.record(self.ownership.services | wanted, self.ownership.vips | vips_wanted)
        present: set[bytes] = set()
        if self.vips is not None:
            self.vips.ensure()
            present = self.vips.addresses()
            for vip in vips_wanted - present:
                self.vips.add(vip)

        kernel_dests = {key: [d.spec for d in self.ipvs.dests(spec)] for key, spec in kernel.items() if key in wanted}
        ops = reconcile.plan(desired, kernel, kernel_dests, self.ownership.services)
        failures = self.ipvs.execute(ops)

        # A service we failed to delete stays ours, and so does its VIP.
        kept = {f.op.service for f in failures if f.op.kind == "delete-service"}
        vips_kept = self.ownership.vips
        if self.vips is not None:
            vips_kept = vips_wanted | {spec.vip for spec in kept}
            for vip in (self.ownership.vips - vips_kept) & present:
                self.vips.remove(vip)
        self.ownership.record(wanted | {spec.key for spec in kept}, vips_kept)

        self._services = by_key
        # Forget weights of backends that left the configuration, and those that merely
        # repeat the configured weight (they would hold back a later increase).
        if self._overrides:
            configured = {(s.key, b.key): b.weight for s in services for b in s.backends}
            self._overrides = {k: w for k, w in self._overrides.items() if w < configured.get(k, -1)}
        result = ApplyResult(ops, self.writes - writes_before, failures)
        if failures:
            raise ApplyError(result)
        return result

    def hold_weight(self, service: ServiceKey, backend: BackendKey, weight: int | None) -> None:
        """Remember the weight the health layer wants without writing it: the next apply
        writes it (or nothing, if the kernel has it already). A weight at or above the
        configured one, or None, gives the backend back to the configuration."""
        if weight is None:
            self._overrides.pop((service, backend), None)
        else:
            self._overrides[(service, backend)] = weight

    def set_weight(self, service: ServiceKey, backend: BackendKey, weight: int | None) -> int:
        """hold_weight, and write the resulting weight now (one write). Returns it."""
        svc = self._services[service]
        configured = next((b for b in svc.backends if b.key == backend), None)
        if configured is None:
            raise KeyError(backend)
        self.hold_weight(service, backend, None if weight is None or weight >= configured.weight else weight)
        effective = self._weight(svc, configured)
        self.ipvs.apply_one(Op("edit-dest", service_spec(svc), dest_spec(svc, configured, effective)))
        return effective

    def _weight(self, service: model.Service, backend: model.Backend) -> int:
        if not self._overrides:  # the common case; keys of addresses are slow to hash
            return backend.weight
        override = self._overrides.get((service.key, backend.key))
        return backend.weight if override is None else min(backend.weight, override)
