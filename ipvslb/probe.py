"""Direct probes of a backend at its own address, bypassing IPVS (which only rewrites
traffic to VIPs). Used to confirm a suspicion and to re-admit a quarantined backend."""
from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import time
from dataclasses import dataclass

from ipvslb import udprequest
from ipvslb.model import IPAddress

# Errors connect() or send() return at once when this host itself has no path: no route,
# a local firewall rule, no usable source address, the interface down. They say nothing
# about the backend. (The same errno arriving later, as SO_ERROR, came from the network.)
LOCAL_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EPERM, errno.EACCES,
                          errno.EADDRNOTAVAIL})


@dataclass(frozen=True)
class ProbeOutcome:
    ok: bool
    detail: str
    elapsed: float
    local: bool = False    # failed on this host: no evidence against the backend
    refused: bool = False  # the backend answered no: this host's path to it works


def failure(err: OSError, elapsed: float, *, immediate: bool) -> ProbeOutcome:
    """A probe that failed with `err`; `immediate`: returned by the call itself, not later."""
    return ProbeOutcome(False, _describe(err), elapsed, local=immediate and err.errno in LOCAL_ERRNOS,
                        refused=err.errno == errno.ECONNREFUSED)


# SO_LINGER on with a linger time of 0: close() sends RST and leaves no TIME_WAIT.
RESET_ON_CLOSE = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def _family(address: IPAddress) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


class TcpProbe:
    """A full TCP handshake to the backend, closed at once with RST so it keeps no TIME_WAIT.

    The SYN leaves when the object is made, not when an event loop next gets round to it:
    the daemon makes the probe in the same step that decided it. A refusal from a backend
    on a local link is often back before connect() returns, so it is looked for at once."""

    def __init__(self, address: IPAddress, port: int):
        self.started = time.monotonic()
        self.sock = socket.socket(_family(address), socket.SOCK_STREAM)
        self.outcome: ProbeOutcome | None = None
        try:
            self.sock.setblocking(False)
            err = self.sock.connect_ex((str(address), port))
            if err == 0:
                self._done(True, "connected")
            elif err != errno.EINPROGRESS:
                self.outcome = failure(OSError(err, os.strerror(err)), time.monotonic() - self.started,
                                       immediate=True)
            else:
                self._check()
        except BaseException:
            self.sock.close()  # the caller gets no object to close
            raise

    def _done(self, ok: bool, detail: str) -> None:
        self.outcome = ProbeOutcome(ok, detail, time.monotonic() - self.started)

    def _check(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        if poller.poll(0):
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.outcome = failure(OSError(err, os.strerror(err)), time.monotonic() - self.started,
                                       immediate=False)
            else:
                self._done(True, "connected")

    async def result(self, timeout: float) -> ProbeOutcome:
        try:
            return await self.connected(timeout)
        finally:
            self.close()

    async def connected(self, timeout: float) -> ProbeOutcome:
        """The handshake's outcome, leaving the socket open: a probe that goes on to talk
        to the backend over it (ipvslb.probes) closes it."""
        if self.outcome is None:
            loop = asyncio.get_running_loop()
            writable = loop.create_future()

            def on_writable() -> None:
                if not writable.done():
                    writable.set_result(None)
            loop.add_writer(self.sock, on_writable)
            try:
                async with asyncio.timeout(max(0.0, timeout - (time.monotonic() - self.started))):
                    await writable
            except TimeoutError:
                self._done(False, f"no answer within {timeout * 1000:.0f} ms")
            finally:
                loop.remove_writer(self.sock)
            if self.outcome is None:
                self._check()
        return self.outcome or ProbeOutcome(False, "no answer", time.monotonic() - self.started)

    def close(self) -> None:
        """Release the socket; a connected one with RST (linger 0), so it keeps no TIME_WAIT.
        Enough on its own once `outcome` is set at construction: there is nothing to wait for."""
        try:
            if self.outcome is not None and self.outcome.ok and self.sock.fileno() != -1:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        finally:
            self.sock.close()


async def probe_tcp(address: IPAddress, port: int, timeout: float) -> ProbeOutcome:
    return await TcpProbe(address, port).result(timeout)


async def probe_udp(address: IPAddress, port: int, timeout: float,
                    request: udprequest.UdpRequest) -> ProbeOutcome:
    """Send one request on a connected socket and wait for a reply that `request` accepts.
    Silence fails the probe, like a reply it does not accept; an ICMP unreachable comes
    back as ECONNREFUSED (or another errno) and fails it at once."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = socket.socket(_family(address), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect((str(address), port))
            sock.send(request.payload)
        except OSError as err:
            return failure(err, time.monotonic() - started, immediate=True)
        try:
            async with asyncio.timeout(timeout):
                reply = await loop.sock_recv(sock, 65535)
        except TimeoutError:
            return ProbeOutcome(False, f"no reply within {timeout * 1000:.0f} ms", time.monotonic() - started)
        except OSError as err:  # the ICMP error the request drew
            return failure(err, time.monotonic() - started, immediate=False)
        wrong = request.judge(reply)
        return ProbeOutcome(wrong is None, wrong or request.what, time.monotonic() - started)
    finally:
        sock.close()


async def probe(protocol: str, address: IPAddress, port: int, timeout: float,
                udp: udprequest.UdpRequest | None = None) -> ProbeOutcome:
    """`udp`: what a UDP probe sends and accepts (udprequest.for_service)."""
    if protocol == "udp":
        return await probe_udp(address, port, timeout, udp or udprequest.UdpRequest(
            udprequest.DEFAULT_PAYLOAD, udprequest.payload_verdict(None), "reply"))
    return await probe_tcp(address, port, timeout)


def _describe(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "error")
    return f"{name} ({os.strerror(err.errno)})" if err.errno else str(err)
