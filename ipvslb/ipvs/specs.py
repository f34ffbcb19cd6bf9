"""IPVS services and destinations as the kernel sees them, and the configured model mapped
onto that shape, so that reconciling is comparing equal values.

Addresses stay packed (4 or 16 bytes): a dump of ten thousand destinations should not
build ten thousand `ipaddress` objects just to compare them.
"""
from __future__ import annotations

import enum
import ipaddress
from socket import AF_INET, AF_INET6
from typing import NamedTuple

from ipvslb import model

# IP_VS_SVC_F_*
SVC_F_PERSISTENT = 0x0001
SVC_F_HASHED = 0x0002
SVC_F_ONEPACKET = 0x0004
SVC_F_SCHED1 = 0x0008
SVC_F_SCHED2 = 0x0010
SVC_F_SCHED3 = 0x0020
# The bits a service definition sets; HASHED is the kernel's own bookkeeping.
SVC_F_MANAGED = SVC_F_PERSISTENT | SVC_F_ONEPACKET | SVC_F_SCHED1 | SVC_F_SCHED2 | SVC_F_SCHED3
# ipvsadm's names; sh and mh give the same bits their own meanings.
SCHEDULER_FLAGS = {
    "flag-1": SVC_F_SCHED1, "sh-fallback": SVC_F_SCHED1, "mh-fallback": SVC_F_SCHED1,
    "flag-2": SVC_F_SCHED2, "sh-port": SVC_F_SCHED2, "mh-port": SVC_F_SCHED2,
    "flag-3": SVC_F_SCHED3,
}

# IP_VS_CONN_F_* forwarding methods
FORWARDING = {"masq": 0, "tunnel": 2, "route": 3}
CONN_F_FWD_MASK = 0x0007

NETMASK_V4 = 0xFFFFFFFF  # what ipvsadm sends for IPv4: persistence per client address
NETMASK_V6 = 128         # an IPv6 netmask is a prefix length


def family_of(packed: bytes) -> int:
    return AF_INET if len(packed) == 4 else AF_INET6


def ip(packed: bytes) -> model.IPAddress:
    return ipaddress.ip_address(packed)


class ServiceSpec(NamedTuple):
    """What identifies and configures a service. `fwmark` services (never ours) have
    protocol "tcp", an all-zero vip and port 0, as the kernel stores them."""

    protocol: str
    vip: bytes
    port: int
    scheduler: str
    flags: int
    timeout: int
    netmask: int
    fwmark: int = 0

    @property
    def key(self) -> tuple:
        if self.fwmark:
            return ("fwmark", family_of(self.vip), self.fwmark)
        return (self.protocol, self.vip, self.port)

    @property
    def family(self) -> int:
        return family_of(self.vip)


class DestSpec(NamedTuple):
    address: bytes
    port: int
    forwarding: int
    weight: int
    u_threshold: int = 0
    l_threshold: int = 0

    @property
    def key(self) -> tuple[bytes, int]:
        return (self.address, self.port)

    @property
    def family(self) -> int:
        return family_of(self.address)


class Stats(NamedTuple):
    conns: int
    inpkts: int
    outpkts: int
    inbytes: int
    outbytes: int
    cps: int
    inpps: int
    outpps: int
    inbps: int
    outbps: int


class KernelService(NamedTuple):
    spec: ServiceSpec
    stats: Stats | None = None


class KernelDest(NamedTuple):
    spec: DestSpec
    active_conns: int = 0
    inactive_conns: int = 0
    persistent_conns: int = 0
    stats: Stats | None = None


def service_key(key: tuple[str, model.IPAddress, int]) -> tuple[str, bytes, int]:
    """model.Service.key -> ServiceSpec.key"""
    protocol, vip, port = key
    return (protocol, vip.packed, port)


def dest_key(key: tuple[model.IPAddress, int]) -> tuple[bytes, int]:
    """model.Backend.key -> DestSpec.key"""
    address, port = key
    return (address.packed, port)


def service_spec(service: model.Service) -> ServiceSpec:
    flags = 0
    for name in service.scheduler_flags:
        flags |= SCHEDULER_FLAGS[name]
    if service.persistence_timeout:
        flags |= SVC_F_PERSISTENT
    return ServiceSpec(
        protocol=service.protocol,
        vip=service.vip.packed,
        port=service.port,
        scheduler=service.scheduler,
        flags=flags,
        timeout=service.persistence_timeout,
        netmask=NETMASK_V4 if service.family == 4 else NETMASK_V6,
    )


def dest_spec(service: model.Service, backend: model.Backend, weight: int | None = None) -> DestSpec:
    return DestSpec(
        address=backend.address.packed,
        port=backend.port,
        forwarding=FORWARDING[service.forwarding],
        weight=backend.weight if weight is None else weight,
    )


class OpKind(enum.Enum):
    """What one write does; the value is how errors and logs name it."""

    ADD_SERVICE = "add-service"
    EDIT_SERVICE = "edit-service"
    DELETE_SERVICE = "delete-service"
    ADD_DEST = "add-dest"
    EDIT_DEST = "edit-dest"
    DELETE_DEST = "delete-dest"


class Op(NamedTuple):
    """One write; dest is None for service operations."""

    kind: OpKind
    service: ServiceSpec
    dest: DestSpec | None = None
