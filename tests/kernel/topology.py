"""Test topology inside the guest: the client is the VM's main namespace, each backend
lives in a network namespace of its own behind a veth pair, VIPs sit on a dummy interface.

Addresses: backend i is 10.77.i.2 / fd77:i::2 behind the client's 10.77.i.1 / fd77:i::1.
Tools like `ip` are used here on purpose: the test bed must not depend on the code under test.
"""
from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNOWNED_MAC = "02:00:5e:00:00:99"
PORT = 8080


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def sysctl(key: str, value: str | int) -> None:
    Path("/proc/sys", key.replace(".", "/")).write_text(f"{value}\n")


@dataclass
class TestBackend:
    index: int
    namespace: str
    host_link: str
    v4: ipaddress.IPv4Address
    v6: ipaddress.IPv6Address
    port: int = PORT
    control: str = ""
    process: subprocess.Popen | None = None
    mode: str = "accept"
    udp_mode: str = "serve"

    @property
    def name(self) -> str:
        return f"b{self.index}"

    def address(self, family: int = 4) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.v4 if family == 4 else self.v6

    def _control(self, word: str) -> None:
        # Up to 30 s: a Python server starting under emulation on a loaded host is slow.
        for _ in range(600):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.control)
                    s.sendall(word.encode() + b"\n")
                    if s.recv(16).strip() == b"ok":
                        return
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)
        raise RuntimeError(f"backend {self.name} does not answer on {self.control}")

    def set_mode(self, mode: str) -> None:
        """accept: serve; refuse: nothing listening (RST); blackhole: SYNs vanish on the wire."""
        if mode not in ("accept", "refuse", "blackhole"):
            raise ValueError(mode)
        if mode == "blackhole":
            # A permanent neighbour entry to a MAC nobody owns: frames leave, nobody answers.
            # (An unreachable route or an unresolved neighbour would fail locally instead.)
            for addr in (self.v4, self.v6):
                sh("ip", "neigh", "replace", str(addr), "lladdr", UNOWNED_MAC, "dev", self.host_link,
                   "nud", "permanent")
        elif self.mode == "blackhole":
            for addr in (self.v4, self.v6):
                sh("ip", "neigh", "del", str(addr), "dev", self.host_link, check=False)
        self._control("refuse" if mode == "refuse" else "accept")
        self.mode = mode

    def set_udp(self, mode: str) -> None:
        """serve: answer datagrams; close: no UDP socket (ICMP port unreachable); silent: read
        datagrams and answer none."""
        if mode not in ("serve", "close", "silent"):
            raise ValueError(mode)
        self._control(f"udp-{mode}")
        self.udp_mode = mode

    def set_delay(self, milliseconds: int) -> None:
        """One-way delay on the client's side of the link (netem); 0 removes it."""
        sh("tc", "qdisc", "del", "dev", self.host_link, "root", check=False)
        if milliseconds:
            sh("tc", "qdisc", "add", "dev", self.host_link, "root", "netem", "delay", f"{milliseconds}ms")


@dataclass
class Topology:
    backends: list[TestBackend] = field(default_factory=list)
    vip_link: str = "tvip0"

    def add_vip(self, vip: str) -> None:
        addr = ipaddress.ip_address(vip)
        prefix = 32 if addr.version == 4 else 128
        sh("ip", "addr", "replace", f"{vip}/{prefix}", "dev", self.vip_link)

    def reset(self) -> None:
        for b in self.backends:
            if b.mode != "accept":
                b.set_mode("accept")
            if b.udp_mode != "serve":
                b.set_udp("serve")
            b.set_delay(0)

    def teardown(self) -> None:
        for b in self.backends:
            if b.process:
                b.process.terminate()
                b.process.wait(5)
            sh("ip", "netns", "del", b.namespace, check=False)
            sh("ip", "link", "del", b.host_link, check=False)
        sh("ip", "link", "del", self.vip_link, check=False)


def build(count: int, prefix: str = "t", first: int = 1) -> Topology:
    """Create `count` backends in namespaces, numbered from `first` (so that two topologies
    can live side by side), and start their echo servers."""
    sysctl("net.ipv4.ip_forward", 1)
    sysctl("net.ipv6.conf.all.forwarding", 1)
    sysctl("net.ipv4.conf.all.rp_filter", 0)
    topo = Topology(vip_link=f"{prefix}vip0")
    sh("ip", "link", "add", topo.vip_link, "type", "dummy")
    sh("ip", "link", "set", topo.vip_link, "up")
    for i in range(first, first + count):
        ns, host_link = f"{prefix}b{i}", f"{prefix}vb{i}"
        b = TestBackend(index=i, namespace=ns, host_link=host_link,
                        v4=ipaddress.IPv4Address(f"10.77.{i}.2"), v6=ipaddress.IPv6Address(f"fd77:{i}::2"),
                        control=f"/run/ipvslb-test-{ns}.sock")
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"10.77.{i}.1/24", "dev", host_link)
        sh("ip", "addr", "add", f"fd77:{i}::1/64", "dev", host_link, "nodad")
        sh("ip", "link", "set", host_link, "up")
        inside = ("ip", "netns", "exec", ns)
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{b.v4}/24", "dev", "eth0")
        sh(*inside, "ip", "addr", "add", f"{b.v6}/64", "dev", "eth0", "nodad")
        sh(*inside, "ip", "link", "set", "eth0", "up")
        sh(*inside, "ip", "route", "add", "default", "via", f"10.77.{i}.1")
        sh(*inside, "ip", "-6", "route", "add", "default", "via", f"fd77:{i}::1")
        b.process = subprocess.Popen([*inside, sys.executable, str(HERE / "backend_server.py"),
                                      "--name", b.name, "--port", str(b.port), "--control", b.control])
        topo.backends.append(b)
    for b in topo.backends:
        b._control("accept")  # waits until the server is up
    return topo
