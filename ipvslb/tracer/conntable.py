"""The kernel's IPVS connection table (/proc/net/ip_vs_conn), for backend attribution when
the ip_vs_conn_new kprobe cannot attach. IPVS has no netlink dump of connections."""
from __future__ import annotations

import ipaddress

from ipvslb.model import IPAddress
from ipvslb.tracer.records import Endpoint

PATH = "/proc/net/ip_vs_conn"
# (protocol, client, vip) -> backend
Table = dict[tuple[str, Endpoint, Endpoint], Endpoint]


def _address(token: str) -> IPAddress:
    token = token.strip("[]")
    if ":" in token:
        return ipaddress.IPv6Address(token)
    return ipaddress.IPv4Address(int(token, 16))


def parse(text: str) -> Table:
    table: Table = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 7:
            continue
        proto, caddr, cport, vaddr, vport, daddr, dport = fields[:7]
        key = (proto.lower(), (_address(caddr), int(cport, 16)), (_address(vaddr), int(vport, 16)))
        table[key] = (_address(daddr), int(dport, 16))
    return table


def read(path: str = PATH) -> Table:
    with open(path) as f:
        return parse(f.read())
