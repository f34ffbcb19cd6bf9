"""VIP addresses on a dummy interface, through pyroute2's rtnetlink.

A connection to a VIP is routed as local only if the VIP is an address of this host; IPVS
then takes it on the way out. A dummy interface holds the addresses without putting them
on any wire (kube-proxy's kube-ipvs0 does the same), and being NOARP it skips IPv6
duplicate address detection, so an IPv6 VIP is usable at once.
"""
from __future__ import annotations

import errno
import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFF_UP = 0x1


class VipInterface:
    """`writes` counts the rtnetlink changes made, like IPVS.writes does for IPVS."""

    def __init__(self, ifname: str, ipr: IPRoute | None = None):
        self.ifname = ifname
        self._ipr = IPRoute() if ipr is None else ipr
        self._index: int | None = None
        self.writes = 0

    def close(self) -> None:
        self._ipr.close()

    def ensure(self) -> int:
        """The interface's index; created (as a dummy) and brought up when needed."""
        found = self._ipr.link_lookup(ifname=self.ifname)
        if not found:
            try:
                self.writes += 1
                self._ipr.link("add", ifname=self.ifname, kind="dummy")
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise
            found = self._ipr.link_lookup(ifname=self.ifname)
        index = found[0]
        (link,) = self._ipr.get_links(index)
        if not link["flags"] & IFF_UP:
            self.writes += 1
            self._ipr.link("set", index=index, state="up")
        self._index = index
        return index

    def addresses(self) -> set[bytes]:
        """Packed addresses now on the interface (none if it does not exist)."""
        found = self._ipr.link_lookup(ifname=self.ifname)
        if not found:
            return set()
        return {ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")).packed
                for msg in self._ipr.get_addr(index=found[0])}

    def add(self, vip: bytes) -> None:
        self._change("add", vip, errno.EEXIST)

    def remove(self, vip: bytes) -> None:
        self._change("del", vip, errno.EADDRNOTAVAIL)

    def _change(self, command: str, vip: bytes, already: int) -> None:
        index = self._index if self._index is not None else self.ensure()
        self.writes += 1
        try:
            self._ipr.addr(command, index=index, address=str(ipaddress.ip_address(vip)), prefixlen=len(vip) * 8)
        except NetlinkError as err:
            if err.code != already:
                raise
