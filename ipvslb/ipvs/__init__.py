"""The only code that speaks IPVS: generic netlink for services and destinations,
rtnetlink for the VIPs, /proc/sys for the sysctls. docs/ipvs.md describes the behaviour.

    manager = Manager(settings)         # sysctls set, owned.json read
    manager.apply(config.services)      # only the difference is written
    manager.set_weight(svc.key, backend.key, 0)
"""
from ipvslb.ipvs.client import IPVS, Failure, IPVSError
from ipvslb.ipvs.manager import ApplyError, ApplyResult, Manager
from ipvslb.ipvs.specs import DestSpec, KernelDest, KernelService, Op, OpKind, ServiceSpec, Stats

__all__ = ["IPVS", "ApplyError", "ApplyResult", "DestSpec", "Failure", "IPVSError", "KernelDest",
           "KernelService", "Manager", "Op", "OpKind", "ServiceSpec", "Stats"]
