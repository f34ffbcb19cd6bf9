"""The IPVS generic-netlink socket: dumps, and writes in batches.

Writes go out many to a datagram. The kernel runs the messages of one datagram in order
inside the send call and answers only failures, plus an acknowledgement for the last
message, which asks for one: one send and one receive per batch instead of a round trip
per rule. Each failure names its message by sequence number, so every operation learns
its own outcome.
"""
from __future__ import annotations

import errno
import itertools
import socket
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ipvslb.ipvs import codec, messages
from ipvslb.ipvs.specs import DestSpec, KernelDest, KernelService, Op, OpKind, ServiceSpec, ip

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10   # failures echo only the header, not the whole request
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
BUFFER_BYTES = 4 << 20
# Bounded so that the failures of one batch always fit the receive buffer.
BATCH_MESSAGES = 256
BATCH_BYTES = 64 << 10
RECV_BYTES = 256 << 10
# The kernel answers within the send call; silence this long means something is broken,
# and a daemon must not hang on it. Well under the packaged unit's WatchdogSec= (30 s): a
# lost reply is an error the daemon logs and survives, not a watchdog kill.
REPLY_TIMEOUT = 5.0

_COMMANDS = {
    OpKind.ADD_SERVICE: messages.CMD_NEW_SERVICE,
    OpKind.EDIT_SERVICE: messages.CMD_SET_SERVICE,
    OpKind.DELETE_SERVICE: messages.CMD_DEL_SERVICE,
    OpKind.ADD_DEST: messages.CMD_NEW_DEST,
    OpKind.EDIT_DEST: messages.CMD_SET_DEST,
    OpKind.DELETE_DEST: messages.CMD_DEL_DEST,
}
# Outcomes that mean "already as asked" when someone else got there first: the kernel
# answers ESRCH for a service that is gone and ENOENT for a destination that is gone.
_ALREADY_DONE = {
    OpKind.ADD_SERVICE: {errno.EEXIST},
    OpKind.ADD_DEST: {errno.EEXIST},
    OpKind.DELETE_SERVICE: {errno.ESRCH, errno.ENOENT},
    OpKind.DELETE_DEST: {errno.ENOENT, errno.ESRCH},
}


class IPVSError(OSError):
    pass


class Failure(NamedTuple):
    op: Op
    errno: int

    def __str__(self) -> str:
        svc = self.op.service
        target = f"{svc.protocol} {ip(svc.vip)}:{svc.port}" if not svc.fwmark else f"fwmark {svc.fwmark}"
        if self.op.dest is not None:
            target += f" -> {ip(self.op.dest.address)}:{self.op.dest.port}"
        return f"{self.op.kind.value} {target}: {errno.errorcode.get(self.errno, self.errno)}"


def family_id() -> int:
    """The IPVS family's number, resolved by pyroute2's generic-netlink controller lookup."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    sock = GenericNetlinkSocket()
    try:
        sock.bind(messages.FAMILY, messages.ipvsmsg)
        return sock.prid
    except NetlinkError as err:
        raise IPVSError(err.code, "no IPVS generic netlink family: is the ip_vs module loaded?") from err
    finally:
        sock.close()


def _open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    for forced, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, BUFFER_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER_BYTES)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    except OSError:
        pass  # before Linux 4.3: failures echo the request, which is only larger
    sock.bind((0, 0))
    sock.settimeout(REPLY_TIMEOUT)
    return sock


class IPVS:
    """One netlink socket to the kernel's IPVS. Not thread-safe; `writes` counts every
    write message sent (the measure of "an unchanged state causes no writes");
    `already_done` counts writes that found their goal reached by someone else, which
    tells a caller planning from a remembered state that the memory was wrong."""

    def __init__(self, sock: socket.socket | None = None, family: int | None = None):
        self._family = family_id() if family is None else family
        self._sock = _open_socket() if sock is None else sock
        self._seq = itertools.count(1)
        self._buf = bytearray(RECV_BYTES)
        self.writes = 0
        self.already_done = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> IPVS:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------

    def services(self, stats: bool = False) -> list[KernelService]:
        return self._dump(messages.CMD_GET_SERVICE, b"",
                          lambda buf, payload, end: codec.parse_service(buf, payload, end, stats))

    def dests(self, service: ServiceSpec, stats: bool = False) -> list[KernelDest]:
        """Destinations of one service; none if the service does not exist."""
        family = service.family
        return self._dump(messages.CMD_GET_DEST, codec.service_id(service),
                          lambda buf, payload, end: codec.parse_dest(buf, payload, end, family, stats))

    # -- writing ---------------------------------------------------------------------

    def execute(self, ops: Iterable[Op]) -> list[Failure]:
        """Send the operations in order; return those that failed (operations whose goal
        someone else already reached, such as deleting what is gone, count as done)."""
        failures: list[Failure] = []
        ids: dict[ServiceSpec, bytes] = {}
        batch: list[bytes] = []
        pending: dict[int, Op] = {}
        size = 0
        for op in ops:
            msg = self._encode(op, ids)
            if batch and (len(batch) == BATCH_MESSAGES or size + len(msg) > BATCH_BYTES):
                self._send_batch(batch, pending, failures)
                batch, pending, size = [], {}, 0
            batch.append(msg)
            pending[codec.seq_of(msg)] = op
            size += len(msg)
        if batch:
            self._send_batch(batch, pending, failures)
        return failures

    def apply_one(self, op: Op) -> None:
        failures = self.execute([op])
        if failures:
            raise IPVSError(failures[0].errno, str(failures[0]))

    def add_service(self, service: ServiceSpec) -> None:
        self.apply_one(Op(OpKind.ADD_SERVICE, service))

    def edit_service(self, service: ServiceSpec) -> None:
        self.apply_one(Op(OpKind.EDIT_SERVICE, service))

    def delete_service(self, service: ServiceSpec) -> None:
        self.apply_one(Op(OpKind.DELETE_SERVICE, service))

    def add_dest(self, service: ServiceSpec, dest: DestSpec) -> None:
        self.apply_one(Op(OpKind.ADD_DEST, service, dest))

    def edit_dest(self, service: ServiceSpec, dest: DestSpec) -> None:
        self.apply_one(Op(OpKind.EDIT_DEST, service, dest))

    def delete_dest(self, service: ServiceSpec, dest: DestSpec) -> None:
        self.apply_one(Op(OpKind.DELETE_DEST, service, dest))

    # -- the wire --------------------------------------------------------------------

    def _encode(self, op: Op, ids: dict[ServiceSpec, bytes]) -> bytes:
        if op.dest is None:
            attrs = codec.service_id(op.service) if op.kind is OpKind.DELETE_SERVICE else codec.service_full(op.service)
        else:
            service = ids.get(op.service)
            if service is None:
                service = ids[op.service] = codec.service_id(op.service)
            attrs = service + (codec.dest_id(op.dest) if op.kind is OpKind.DELETE_DEST else codec.dest_full(op.dest))
        return codec.message(self._family, _COMMANDS[op.kind], codec.NLM_F_REQUEST, next(self._seq), attrs)

    def _send_batch(self, batch: list[bytes], pending: dict[int, Op], failures: list[Failure]) -> None:
        last = codec.seq_of(batch[-1])
        batch[-1] = codec.set_flags(batch[-1], codec.NLM_F_REQUEST | codec.NLM_F_ACK)
        self.writes += len(batch)
        self._sock.send(b"".join(batch))
        while True:
            for kind, seq, payload, _ in self._receive():
                if kind != codec.NLMSG_ERROR or seq not in pending:
                    continue
                code = codec.error_code(self._buf, payload)
                op = pending[seq]
                if code in _ALREADY_DONE.get(op.kind, ()):
                    self.already_done += 1
                elif code:
                    failures.append(Failure(op, code))
                if seq == last:
                    return

    def _receive(self) -> list[tuple[int, int, int, int]]:
        try:
            length = self._sock.recv_into(self._buf)
        except TimeoutError as err:
            raise IPVSError(errno.ETIMEDOUT, f"no IPVS reply in {REPLY_TIMEOUT:.0f} s") from err
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise IPVSError(err.errno, "IPVS replies were lost (receive buffer overrun); "
                                "the outcome of the last batch is unknown") from err
            raise
        try:
            return list(codec.split(self._buf, length))
        except codec.MalformedReply as err:
            raise _malformed(err) from err

    def _dump(self, cmd: int, attrs: bytes, parse: Callable) -> list:
        seq = next(self._seq)
        self._sock.send(codec.message(self._family, cmd, codec.NLM_F_REQUEST | codec.NLM_F_DUMP, seq, attrs))
        out: list = []
        while True:
            for kind, mseq, payload, end in self._receive():
                if mseq != seq:
                    continue
                if kind == codec.NLMSG_DONE:
                    return out
                if kind == codec.NLMSG_ERROR:
                    code = codec.error_code(self._buf, payload)
                    raise IPVSError(code, f"IPVS dump (command {cmd}) failed: {errno.errorcode.get(code, code)}")
                try:
                    out.append(parse(self._buf, payload, end))
                except codec.MalformedReply as err:
                    raise _malformed(err) from err

def _malformed(err: Exception) -> IPVSError:
    return IPVSError(errno.EBADMSG, f"malformed IPVS reply: {err}")
