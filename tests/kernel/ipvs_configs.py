"""Configurations A and B for the IPVS tests, built from the model directly, and the
`ipvsadm -Ln` listing each must produce. Backend i of the topology is 10.77.i.2 /
fd77:i::2 and serves TCP and UDP on 8080; the other ports exist only as IPVS rules."""
from __future__ import annotations

import ipaddress

from ipvslb.model import Backend, Service

ip = ipaddress.ip_address
V4 = {i: ip(f"10.77.{i}.2") for i in (1, 2, 3)}
V6 = {i: ip(f"fd77:{i}::2") for i in (1, 2, 3)}
WEB, DNS, WEB6, DIRECT, DNS6 = (ip("10.90.0.1"), ip("10.90.0.2"), ip("fd90::1"), ip("10.90.0.4"), ip("fd90::2"))
HAND_MADE = "10.99.0.1:80"


def config_a() -> list[Service]:
    return [
        Service("web", "tcp", WEB, 80, (Backend(V4[1], 8080), Backend(V4[2], 8080)), scheduler="wlc"),
        Service("dns", "udp", DNS, 53, tuple(Backend(V4[i], 8080) for i in (1, 2, 3)), scheduler="rr"),
        Service("web6", "tcp", WEB6, 80, (Backend(V6[1], 8080, 2), Backend(V6[2], 8080)), scheduler="sh",
                scheduler_flags=("sh-port",), persistence_timeout=300),
        Service("direct", "tcp", DIRECT, 443, (Backend(V4[1], 443, 5), Backend(V4[2], 443)),
                scheduler="rr", forwarding="route"),
    ]


def config_b() -> list[Service]:
    """Weights changed, a backend added and one removed, a scheduler changed, a service
    removed (web6) and one added (dns6), a forwarding method changed."""
    return [
        Service("web", "tcp", WEB, 80, (Backend(V4[1], 8080, 3), Backend(V4[3], 8080)), scheduler="rr"),
        Service("dns", "udp", DNS, 53, tuple(Backend(V4[i], 8080) for i in (1, 2, 3)), scheduler="rr"),
        Service("direct", "tcp", DIRECT, 443, (Backend(V4[1], 443, 5), Backend(V4[2], 443, 4)),
                scheduler="rr", forwarding="tunnel"),
        Service("dns6", "udp", DNS6, 53, tuple(Backend(V6[i], 8080) for i in (1, 2, 3)), scheduler="rr"),
    ]


# service -> (scheduler and flags as ipvsadm prints them, {destination: (forward, weight)})
LISTING_A = {
    "TCP 10.90.0.1:80": ("wlc", {"10.77.1.2:8080": ("Masq", 1), "10.77.2.2:8080": ("Masq", 1)}),
    "UDP 10.90.0.2:53": ("rr", {"10.77.1.2:8080": ("Masq", 1), "10.77.2.2:8080": ("Masq", 1),
                                "10.77.3.2:8080": ("Masq", 1)}),
    "TCP [fd90::1]:80": ("sh (sh-port) persistent 300", {"[fd77:1::2]:8080": ("Masq", 2),
                                                         "[fd77:2::2]:8080": ("Masq", 1)}),
    "TCP 10.90.0.4:443": ("rr", {"10.77.1.2:443": ("Route", 5), "10.77.2.2:443": ("Route", 1)}),
}

LISTING_B = {
    "TCP 10.90.0.1:80": ("rr", {"10.77.1.2:8080": ("Masq", 3), "10.77.3.2:8080": ("Masq", 1)}),
    "UDP 10.90.0.2:53": LISTING_A["UDP 10.90.0.2:53"],
    "TCP 10.90.0.4:443": ("rr", {"10.77.1.2:443": ("Tunnel", 5), "10.77.2.2:443": ("Tunnel", 4)}),
    "UDP [fd90::2]:53": ("rr", {"[fd77:1::2]:8080": ("Masq", 1), "[fd77:2::2]:8080": ("Masq", 1),
                                "[fd77:3::2]:8080": ("Masq", 1)}),
}


def parse_listing(text: str) -> dict[str, tuple[str, dict[str, tuple[str, int]]]]:
    """`ipvsadm -Ln` as {"PROTO vip:port": (scheduler and flags, {dest: (forward, weight)})}."""
    services: dict = {}
    current = None
    for line in text.splitlines()[3:]:
        fields = line.split()
        if line.startswith("  ->"):
            services[current][1][fields[1]] = (fields[2], int(fields[3]))
        elif fields:
            current = f"{fields[0]} {fields[1]}"
            services[current] = (" ".join(fields[2:]), {})
    return services
