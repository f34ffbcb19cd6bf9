"""The IPVS generic-netlink family, declared on pyroute2's generic-netlink base.

Debian's python3-pyroute2 (0.7.2 in 12, 0.7.7 in 13) has no `pyroute2.ipvs`, so the family
is declared here from linux/include/uapi/linux/ip_vs.h. These classes are the one place
that names the commands and attributes: `codec` takes its attribute numbers from the
`nla_map`s below.
"""
from __future__ import annotations

from pyroute2.netlink import genlmsg, nla

FAMILY = "IPVS"
VERSION = 1

# enum in ip_vs.h, in order from IPVS_CMD_UNSPEC = 0
(CMD_UNSPEC, CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE,
 CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST,
 CMD_NEW_DAEMON, CMD_DEL_DAEMON, CMD_GET_DAEMON,
 CMD_SET_CONFIG, CMD_GET_CONFIG, CMD_SET_INFO, CMD_GET_INFO, CMD_ZERO, CMD_FLUSH) = range(18)

STATS_MAP = (
    ("IPVS_STATS_ATTR_UNSPEC", "none"),
    ("IPVS_STATS_ATTR_CONNS", "uint32"),
    ("IPVS_STATS_ATTR_INPKTS", "uint32"),
    ("IPVS_STATS_ATTR_OUTPKTS", "uint32"),
    ("IPVS_STATS_ATTR_INBYTES", "uint64"),
    ("IPVS_STATS_ATTR_OUTBYTES", "uint64"),
    ("IPVS_STATS_ATTR_CPS", "uint32"),
    ("IPVS_STATS_ATTR_INPPS", "uint32"),
    ("IPVS_STATS_ATTR_OUTPPS", "uint32"),
    ("IPVS_STATS_ATTR_INBPS", "uint32"),
    ("IPVS_STATS_ATTR_OUTBPS", "uint32"),
    ("IPVS_STATS_ATTR_PAD", "none"),
)

STATS64_MAP = tuple((name, "uint64" if kind == "uint32" else kind) for name, kind in STATS_MAP)


class ipvs_stats(nla):
    prefix = "IPVS_STATS_ATTR_"
    nla_map = STATS_MAP


class ipvs_stats64(nla):
    prefix = "IPVS_STATS_ATTR_"
    nla_map = STATS64_MAP


class ipvsmsg(genlmsg):
    """Every IPVS command except GET_INFO's reply, which numbers its attributes its own way."""

    prefix = "IPVS_CMD_ATTR_"
    nla_map = (
        ("IPVS_CMD_ATTR_UNSPEC", "none"),
        ("IPVS_CMD_ATTR_SERVICE", "service"),
        ("IPVS_CMD_ATTR_DEST", "dest"),
        ("IPVS_CMD_ATTR_DAEMON", "hex"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_UDP", "uint32"),
    )

    class service(nla):
        prefix = "IPVS_SVC_ATTR_"
        nla_map = (
            ("IPVS_SVC_ATTR_UNSPEC", "none"),
            ("IPVS_SVC_ATTR_AF", "uint16"),
            ("IPVS_SVC_ATTR_PROTOCOL", "uint16"),
            # union nf_inet_addr: 16 bytes, an IPv4 address in the first 4
            ("IPVS_SVC_ATTR_ADDR", "cdata"),
            ("IPVS_SVC_ATTR_PORT", "be16"),
            ("IPVS_SVC_ATTR_FWMARK", "uint32"),
            ("IPVS_SVC_ATTR_SCHED_NAME", "asciiz"),
            ("IPVS_SVC_ATTR_FLAGS", "svc_flags"),
            ("IPVS_SVC_ATTR_TIMEOUT", "uint32"),
            # host order: all ones for IPv4, a prefix length for IPv6
            ("IPVS_SVC_ATTR_NETMASK", "uint32"),
            ("IPVS_SVC_ATTR_STATS", "stats"),
            ("IPVS_SVC_ATTR_PE_NAME", "asciiz"),
            ("IPVS_SVC_ATTR_STATS64", "stats64"),
        )

        class svc_flags(nla):
            """struct ip_vs_flags: the kernel changes only the bits set in mask."""

            fields = (("flags", "I"), ("mask", "I"))

        # pyroute2 looks nested classes up on the enclosing class
        stats = ipvs_stats
        stats64 = ipvs_stats64

    class dest(nla):
        prefix = "IPVS_DEST_ATTR_"
        nla_map = (
            ("IPVS_DEST_ATTR_UNSPEC", "none"),
            ("IPVS_DEST_ATTR_ADDR", "cdata"),
            ("IPVS_DEST_ATTR_PORT", "be16"),
            ("IPVS_DEST_ATTR_FWD_METHOD", "uint32"),
            ("IPVS_DEST_ATTR_WEIGHT", "uint32"),
            ("IPVS_DEST_ATTR_U_THRESH", "uint32"),
            ("IPVS_DEST_ATTR_L_THRESH", "uint32"),
            ("IPVS_DEST_ATTR_ACTIVE_CONNS", "uint32"),
            ("IPVS_DEST_ATTR_INACT_CONNS", "uint32"),
            ("IPVS_DEST_ATTR_PERSIST_CONNS", "uint32"),
            ("IPVS_DEST_ATTR_STATS", "stats"),
            # since Linux 4.3: a destination may differ in family from its service
            ("IPVS_DEST_ATTR_ADDR_FAMILY", "uint16"),
            ("IPVS_DEST_ATTR_STATS64", "stats64"),
            ("IPVS_DEST_ATTR_TUN_TYPE", "uint8"),
            ("IPVS_DEST_ATTR_TUN_PORT", "be16"),
            ("IPVS_DEST_ATTR_TUN_FLAGS", "uint16"),
        )

        # pyroute2 looks nested classes up on the enclosing class
        stats = ipvs_stats
        stats64 = ipvs_stats64


def attr_numbers(nla_map) -> dict[str, int]:
    """Attribute name -> type number, as pyroute2 numbers a positional nla_map."""
    return {name: number for number, (name, _) in enumerate(nla_map)}
