"""Direct probes of a backend at its own address, bypassing IPVS (which only rewrites
traffic to VIPs). Used to confirm a suspicion and to re-admit a quarantined backend."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from dataclasses import dataclass

from ipvslb.model import IPAddress


@dataclass(frozen=True)
class ProbeOutcome:
    ok: bool
    detail: str
    elapsed: float


def _family(address: IPAddress) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


async def probe_tcp(address: IPAddress, port: int, timeout: float) -> ProbeOutcome:
    """A full TCP handshake, closed at once with RST so the backend keeps no TIME_WAIT."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        # asyncio.timeout, not wait_for: no extra task between the SYN and the answer.
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (str(address), port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        return ProbeOutcome(True, "connected", time.monotonic() - started)
    except asyncio.TimeoutError:
        return ProbeOutcome(False, f"no answer within {timeout * 1000:.0f} ms", time.monotonic() - started)
    except OSError as err:
        return ProbeOutcome(False, _describe(err), time.monotonic() - started)
    finally:
        sock.close()


async def probe_udp(address: IPAddress, port: int, timeout: float, payload: bytes = b"\n") -> ProbeOutcome:
    """Send one datagram on a connected socket. An ICMP unreachable comes back as
    ECONNREFUSED and fails the probe; a reply or silence passes it, since many UDP services
    do not answer arbitrary payloads and silence is no evidence of failure."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = socket.socket(_family(address), socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((str(address), port))
        sock.send(payload)
        async with asyncio.timeout(timeout):
            await loop.sock_recv(sock, 65535)
        return ProbeOutcome(True, "reply", time.monotonic() - started)
    except asyncio.TimeoutError:
        return ProbeOutcome(True, "no reply, no ICMP error", time.monotonic() - started)
    except OSError as err:
        return ProbeOutcome(False, _describe(err), time.monotonic() - started)
    finally:
        sock.close()


async def probe(protocol: str, address: IPAddress, port: int, timeout: float) -> ProbeOutcome:
    if protocol == "udp":
        return await probe_udp(address, port, timeout)
    return await probe_tcp(address, port, timeout)


def _describe(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "error")
    return f"{name} ({os.strerror(err.errno)})" if err.errno else str(err)
