"""An independent witness of what crossed a link: the kernel's receive timestamp of TCP
resets, captured with a packet socket, on the same clock as time.monotonic().

The daemon's own records say when its tracer saw a reset; this says when the reset reached
the host, without going through anything the daemon loads."""
from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # not in Python's socket module; asm-generic/socket.h, x86 included
SO_RCVBUFFORCE = 33  # likewise
TCP_RST = 0x04


def _realtime_to_monotonic() -> float:
    """Offset to turn a CLOCK_REALTIME packet timestamp into time.monotonic() (no NTP steps
    happen inside a test VM, so one offset holds for the test)."""
    before = time.monotonic()
    real = time.clock_gettime(time.CLOCK_REALTIME)
    after = time.monotonic()
    return real - (before + after) / 2


class ResetWatch:
    """Collects the arrival time of every TCP RST sent from address:port that reaches `link`."""

    def __init__(self, link: str, address: str, port: int):
        self.source = (ipaddress.ip_address(address).packed, port)
        self.arrivals: list[float] = []
        self._offset = _realtime_to_monotonic()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # Every frame on the link queues here until this thread reads it, and under emulation
        # a test's client threads can starve it for seconds: the default buffer (about 200
        # KiB, some hundred frames) then overflows and drops the very RST being waited for.
        # Frames keep their arrival time however late they are read.
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self._sock.bind((link, 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, ancillary, _, _ = self._sock.recvmsg(256, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            if not self._is_reset(frame):
                continue
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = struct.unpack("qq", data[:16])
                    self.arrivals.append(seconds + nanoseconds / 1e9 - self._offset)

    def _is_reset(self, frame: bytes) -> bool:
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        address, port = self.source
        ip_header = 14  # after the Ethernet header
        if ethertype == 0x0800 and len(address) == 4:
            header_length = (frame[ip_header] & 0x0F) * 4
            if frame[ip_header + 9] != socket.IPPROTO_TCP or frame[ip_header + 12:ip_header + 16] != address:
                return False
            tcp = ip_header + header_length
        elif ethertype == 0x86DD and len(address) == 16:
            if frame[ip_header + 6] != socket.IPPROTO_TCP or frame[ip_header + 8:ip_header + 24] != address:
                return False
            tcp = ip_header + 40
        else:
            return False
        source_port = struct.unpack_from("!H", frame, tcp)[0]
        return source_port == port and bool(frame[tcp + 13] & TCP_RST)

    def first_after(self, moment: float) -> float | None:
        return min((t for t in self.arrivals if t >= moment), default=None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> ResetWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
