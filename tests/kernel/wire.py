"""An independent witness of what crossed a link: the kernel's timestamps of TCP resets from
a backend and of SYNs to it, captured with a packet socket, on the same clock as
time.monotonic().

The daemon's own records say when its tracer saw a reset or a connect; this says when the
reset reached the host, or the SYN left it, without going through anything the daemon loads."""
from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # not in Python's socket module; asm-generic/socket.h, x86 included
SO_RCVBUFFORCE = 33  # likewise
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10


def _realtime_to_monotonic() -> float:
    """Offset to turn a CLOCK_REALTIME packet timestamp into time.monotonic() (no NTP steps
    happen inside a test VM, so one offset holds for the test)."""
    before = time.monotonic()
    real = time.clock_gettime(time.CLOCK_REALTIME)
    after = time.monotonic()
    return real - (before + after) / 2


class _Watch:
    """Reads every frame on `link` with the kernel's timestamp and hands the TCP segments
    from or to address:port to `_seen` (a packet socket sees frames leaving the host as well
    as arriving)."""

    def __init__(self, link: str, address: str, port: int):
        self.endpoint = (ipaddress.ip_address(address).packed, port)
        self._offset = _realtime_to_monotonic()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # Every frame on the link queues here until this thread reads it, and under emulation
        # a test's client threads can starve it for seconds: the default buffer (about 200
        # KiB, some hundred frames) then overflows and drops the very segment being waited
        # for. Frames keep their timestamp however late they are read.
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self._sock.bind((link, 0))
        self._sock.settimeout(0.2)
        self._stopped_at = float("inf")  # set by close(), from another thread
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # On close, frames from before it may still be queued (this thread was starved):
        # read on until the queue is empty or a frame is stamped after the close.
        while True:
            try:
                frame, ancillary, _, _ = self._sock.recvmsg(256, socket.CMSG_SPACE(16))
            except TimeoutError:
                if self._stopped_at < float("inf"):
                    return
                continue
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = struct.unpack("qq", data[:16])
                    t = seconds + nanoseconds / 1e9 - self._offset
                    if t > self._stopped_at:
                        return
                    for outgoing in (False, True):
                        if segment := self._tcp(frame, outgoing):
                            self._seen(t, outgoing, *segment)

    def _seen(self, t: float, outgoing: bool, flags: int, peer_port: int) -> None:
        raise NotImplementedError

    def _tcp(self, frame: bytes, outgoing: bool) -> tuple[int, int] | None:
        """(TCP flags, the other side's port) of a segment from the endpoint (or, `outgoing`,
        to it), else None."""
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        address, port = self.endpoint
        ip_header = 14  # after the Ethernet header
        if ethertype == 0x0800 and len(address) == 4:
            header_length = (frame[ip_header] & 0x0F) * 4
            at = ip_header + (16 if outgoing else 12)
            if frame[ip_header + 9] != socket.IPPROTO_TCP or frame[at:at + 4] != address:
                return None
            tcp = ip_header + header_length
        elif ethertype == 0x86DD and len(address) == 16:
            at = ip_header + (24 if outgoing else 8)
            if frame[ip_header + 6] != socket.IPPROTO_TCP or frame[at:at + 16] != address:
                return None
            tcp = ip_header + 40
        else:
            return None
        source, destination = struct.unpack_from("!HH", frame, tcp)
        if (destination if outgoing else source) != port:
            return None
        return frame[tcp + 13], (source if outgoing else destination)

    def close(self) -> None:
        self._stopped_at = time.monotonic()
        self._thread.join()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ResetWatch(_Watch):
    """Every TCP RST sent from address:port that reaches `link`."""

    def __init__(self, link: str, address: str, port: int):
        self.arrivals: list[float] = []
        super().__init__(link, address, port)

    def _seen(self, t: float, outgoing: bool, flags: int, peer_port: int) -> None:
        if not outgoing and flags & TCP_RST:
            self.arrivals.append(t)

    def first_after(self, moment: float) -> float | None:
        return min((t for t in self.arrivals if t >= moment), default=None)


class SynWatch(_Watch):
    """Every SYN that leaves on `link` for address:port, and every SYN-ACK that answers one."""

    def __init__(self, link: str, address: str, port: int):
        self.syns: list[tuple[float, int]] = []         # (time, client port)
        self.syn_acks: list[tuple[float, int]] = []
        super().__init__(link, address, port)

    def _seen(self, t: float, outgoing: bool, flags: int, peer_port: int) -> None:
        if outgoing and flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            self.syns.append((t, peer_port))
        elif not outgoing and flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK:
            self.syn_acks.append((t, peer_port))

    def first_unanswered_after(self, moment: float) -> float | None:
        """When the first SYN after `moment` that no SYN-ACK answered left: the first one
        a blackhole swallowed, whatever crossed the link while the blackhole was being set."""
        answered = {}
        for t, port in self.syn_acks:
            answered.setdefault(port, []).append(t)
        return min((t for t, port in self.syns
                    if t >= moment and not any(a >= t for a in answered.get(port, ()))), default=None)
