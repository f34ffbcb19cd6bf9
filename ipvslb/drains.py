"""Backends an operator drained: `<state_dir>/drains.json`.

A drained backend gets weight 0 in IPVS whatever its health or configuration says: IPVS
sends it no new connections and leaves the established ones alone. The record outlives
the process, so a drain holds across restarts and reloads until `ipvslb undrain`; it is
written before the kernel is changed (a crash in between leaves the operator's intent on
disk, applied at the next start). A drain names the service by protocol, VIP and port,
as IPVS does, so renaming a service in the configuration keeps it.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ipvslb import statedir
from ipvslb.model import Endpoint, ServiceKey

log = logging.getLogger(__name__)

FILENAME = "drains.json"
FORMAT = 1

Drain = tuple[ServiceKey, Endpoint]


class Drains:
    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / FILENAME
        self.drained: frozenset[Drain] = frozenset()
        self._load()

    def __contains__(self, drain: Drain) -> bool:
        return drain in self.drained

    def __bool__(self) -> bool:
        return bool(self.drained)

    def __iter__(self) -> Iterator[Drain]:
        return iter(self.drained)

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            self.drained = frozenset(
                ((proto, ipaddress.ip_address(vip), int(port)), (ipaddress.ip_address(addr), int(bport)))
                for proto, vip, port, addr, bport in doc["drains"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as err:
            # Not one we wrote (we write atomically): a drain lost is visible in `ipvslb
            # status`, a daemon that does not start is worse.
            log.error("ignoring unreadable %s, no backend is drained: %s", self.path, err)

    def record(self, drained: frozenset[Drain]) -> None:
        """Make `drained` the drains, on disk first. OSError when it cannot be written
        (the drains in memory are then unchanged)."""
        if drained == self.drained:
            return
        doc = {"format": FORMAT,
               "drains": sorted([proto, str(vip), port, str(addr), bport]
                                for (proto, vip, port), (addr, bport) in drained)}
        statedir.write_json(self.path, doc)
        self.drained = drained
