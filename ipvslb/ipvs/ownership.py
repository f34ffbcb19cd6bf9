"""Which IPVS services and VIP addresses are ours: `<state_dir>/owned.json`.

The daemon owns the services it created and those its configuration names; nothing else
is ever edited or deleted. The record outlives the process, so a restart can still delete
a service that left the configuration while the daemon was down. It is written before
the kernel is changed (a crash between the two leaves at most a claim on something that
does not exist, never a service we created and forgot), atomically (a temporary file of
its own, fsync, rename, fsync of the directory).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_ntop

from ipvslb import statedir

log = logging.getLogger(__name__)

FILENAME = "owned.json"
FORMAT = 1
# VIP text by inet_ntop, not ipaddress: a reload may write every service's VIP; _load reads both.
_FAMILY = {4: AF_INET, 16: AF_INET6}


class Ownership:
    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / FILENAME
        self.services: frozenset[tuple[str, bytes, int]] = frozenset()
        self.vips: frozenset[bytes] = frozenset()
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            self.services = frozenset((proto, ipaddress.ip_address(vip).packed, int(port))
                                      for proto, vip, port in doc["services"])
            self.vips = frozenset(ipaddress.ip_address(vip).packed for vip in doc["vips"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as err:
            # Forgetting ownership is the safe direction: we then delete nothing we did
            # not create in this run; a stale service stays until removed by hand.
            log.warning("ignoring unreadable %s: %s", self.path, err)

    def record(self, services: frozenset[tuple[str, bytes, int]], vips: frozenset[bytes]) -> None:
        if services == self.services and vips == self.vips:
            return
        doc = {
            "format": FORMAT,
            "services": sorted([proto, inet_ntop(_FAMILY[len(vip)], vip), port] for proto, vip, port in services),
            "vips": sorted(inet_ntop(_FAMILY[len(vip)], vip) for vip in vips),
        }
        statedir.write_json(self.path, doc)
        self.services, self.vips = services, vips

