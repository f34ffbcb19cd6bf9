"""The typed configuration model every other module works with.

Plain frozen dataclasses: `config` builds them from YAML (and is the only module that
parses), `ipvs` turns services into netlink messages, `health` reads its settings from
`HealthSettings`. Defaults here are the documented defaults (docs/configuration.md).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["tcp", "udp"]
Forwarding = Literal["masq", "route", "tunnel"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# An address and port: a backend, a VIP, a client. Services add the protocol in front.
Endpoint = tuple[IPAddress, int]
ServiceKey = tuple[Protocol, IPAddress, int]
# The one protocol table (IP protocol numbers), shared by the config, IPVS and the tracer.
PROTOCOLS: dict[str, int] = {"tcp": 6, "udp": 17}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


def format_endpoint(endpoint: Endpoint) -> str:
    """`10.0.0.1:80`, `[fd00::1]:80`: how every log line, status row and error shows one."""
    addr, port = endpoint
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos")
# Names as ipvsadm spells them; the kernel knows them as IP_VS_SVC_F_SCHED1..3.
SCHEDULER_FLAGS = ("flag-1", "flag-2", "flag-3", "sh-fallback", "sh-port", "mh-fallback", "mh-port")


ProbeType = Literal["tcp", "udp", "http", "https", "tls", "dns", "exec"]
PROBE_TYPES: tuple[str, ...] = ("tcp", "udp", "http", "https", "tls", "dns", "exec")
# DNS query types and response codes a `dns` probe names (RFC 1035, 3596, 2782).
DNS_TYPES: dict[str, int] = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16,
                             "AAAA": 28, "SRV": 33}
DNS_RCODES: dict[str, int] = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4,
                              "REFUSED": 5}


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe asks a backend whether it serves (`health.probe`, docs/configuration.md).
    Keys of other types than `type` keep their defaults (config refuses them)."""

    # None: the service's protocol (a TCP connect, or the UDP request of udp_probe_payload).
    type: ProbeType | None = None
    # Seconds; None: the health engine's probe timeout (the adaptive connect deadline).
    timeout: float | None = None
    # http, https
    method: str = "GET"
    path: str = "/"
    # None: any status from 200 to 399.
    expect_status: tuple[int, ...] | None = None
    # None: the backend's address (and port).
    host: str | None = None
    # https, tls
    server_name: str | None = None  # None: `host`, else the backend's address
    verify: bool = True
    ca_file: str | None = None      # None: the system's trusted CAs
    # dns
    query_name: str = "."
    query_type: str = "NS"
    transport: Literal["udp", "tcp"] = "udp"
    expect_rcodes: tuple[str, ...] = ("NOERROR",)
    # exec: argv[0] an absolute path, run without a shell.
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthSettings:
    """Passive health and re-admission; see ../shared/design/health.md for the reasoning."""

    enabled: bool = True
    # Adaptive connect deadline: max(floor, multiple x recent connect-time p99).
    connect_deadline_floor: float = 0.200
    connect_deadline_multiple: float = 4.0
    # Connects needed before the deadline is trusted; before that only the first SYN
    # retransmit (1 s) counts as a soft failure.
    connect_history_min: int = 20
    failure_threshold: int = 3
    # An opt-in cap on backends out at once; None: only "never the last usable backend".
    max_quarantined: int | None = None
    quarantine_weight: int = 0
    probe_backoff_initial: float = 1.0
    probe_backoff_factor: float = 2.0
    probe_backoff_max: float = 30.0
    probe_jitter: float = 0.2
    rise: int = 2
    slow_start: float = 10.0
    slow_start_initial_fraction: float = 0.1
    probation: float = 30.0
    # UDP: requests without a reply inside this window are a soft failure.
    udp_reply_window: float = 1.0
    # What a UDP probe sends (one byte per character, \x00-\xff), and what the reply must
    # contain (None: any reply). None: a DNS query on port 53, a newline elsewhere.
    udp_probe_payload: str | None = None
    udp_probe_expect: str | None = None
    # The name whose NS records a DNS probe asks for (services on port 53).
    dns_probe_name: str = "."
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    # Seconds between background checks of every backend with `probe`; None: none, the
    # probe only confirms evidence and re-admits.
    active_interval: float | None = None


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    port: int
    weight: int = 1

    @property
    def key(self) -> Endpoint:
        return (self.address, self.port)


@dataclass(frozen=True)
class Service:
    name: str
    protocol: Protocol
    vip: IPAddress
    port: int
    backends: tuple[Backend, ...]
    scheduler: str = "wlc"
    persistence_timeout: int = 0
    forwarding: Forwarding = "masq"
    scheduler_flags: tuple[str, ...] = ()
    health: HealthSettings = field(default_factory=HealthSettings)

    @property
    def key(self) -> ServiceKey:
        return (self.protocol, self.vip, self.port)

    @property
    def family(self) -> int:
        return self.vip.version


@dataclass(frozen=True)
class Sysctls:
    """IPVS sysctls the daemon sets at start; docs/configuration.md says why each."""

    conntrack: bool = True
    expire_nodest_conn: bool = True
    expire_quiescent_template: bool = True
    # "auto" picks 0 before kernel 5.9 (reused ports would stall 1 s) and 1 from 5.9 on.
    conn_reuse_mode: Literal["auto", 0, 1, 2] = "auto"


@dataclass(frozen=True)
class TracerSettings:
    connection_capacity: int = 65536
    ring_buffer_pages: int = 64
    report_closed: bool = False
    # Seconds: routine records wake the daemon at most this often (failures at once). Below
    # the default connect_deadline_floor (0.2 s), so a connect is read before its deadline.
    wakeup_interval: float = 0.1
    # Seconds: per (VIP, backend), one connect per interval is timed with records; the other
    # successes are counted in the kernel (0: every connect is reported).
    sample_interval: float = 0.02


@dataclass(frozen=True)
class Settings:
    vip_interface: str = "ipvslb0"
    manage_vips: bool = True
    state_dir: str = "/var/lib/ipvslb"
    status_socket: str = "/run/ipvslb/status.sock"
    # The root-only socket `ipvslb drain` talks to; None: control.sock beside status_socket.
    control_socket: str | None = None
    metrics_address: str = "127.0.0.1:9742"
    log_level: str = "info"
    # The daemon's nice value once its tracer is loaded: its reaction to evidence waits for a
    # CPU, and on a busy host the applications it balances for compete for that CPU. None
    # keeps the priority it was started with.
    nice: int | None = -10
    # Seconds the IPVS manager trusts its record of what it wrote before reading the
    # kernel back in full; the daemon verifies this often, repairing others' changes.
    ipvs_verify_interval: float = 30.0
    # The operator's command (an argv, no shell) run on each backend health transition,
    # the transition in its environment (ipvslb.notify); None: none.
    notify_command: tuple[str, ...] | None = None
    # Seconds a hook may run before it is killed.
    notify_timeout: float = 10.0
    # Hooks running at once; later transitions wait (a bounded backlog).
    notify_concurrency: int = 4
    sysctls: Sysctls = field(default_factory=Sysctls)
    tracer: TracerSettings = field(default_factory=TracerSettings)

    def control_path(self) -> str:
        """The control socket's path: control_socket, or control.sock in status_socket's directory."""
        if self.control_socket is not None:
            return self.control_socket
        return self.status_socket.rsplit("/", 1)[0] + "/control.sock"


@dataclass(frozen=True)
class Config:
    settings: Settings = field(default_factory=Settings)
    services: tuple[Service, ...] = ()
