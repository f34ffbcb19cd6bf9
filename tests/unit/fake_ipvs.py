"""A stand-in for the kernel end of an IPVS netlink socket, for unit tests of the client
and the manager. It reads requests and writes replies with pyroute2's classes from
ipvslb.ipvs.messages, never with ipvslb.ipvs.codec, so it checks the codec as well.
Error numbers are the kernel's: EEXIST on a second add, ESRCH for a missing service,
ENOENT for a missing destination."""
from __future__ import annotations

import collections
import errno
import struct

from ipvslb.ipvs import messages

FAMILY = 0x1F
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x2, 0x4, 0x300
HEADER = struct.Struct("=IHHII")

SVC_OPTIONS = ("IPVS_SVC_ATTR_SCHED_NAME", "IPVS_SVC_ATTR_FLAGS", "IPVS_SVC_ATTR_TIMEOUT", "IPVS_SVC_ATTR_NETMASK")
DEST_OPTIONS = ("IPVS_DEST_ATTR_FWD_METHOD", "IPVS_DEST_ATTR_WEIGHT", "IPVS_DEST_ATTR_U_THRESH",
                "IPVS_DEST_ATTR_L_THRESH")
STATS = [["IPVS_STATS_ATTR_CONNS", 7], ["IPVS_STATS_ATTR_INPKTS", 70], ["IPVS_STATS_ATTR_OUTPKTS", 60],
         ["IPVS_STATS_ATTR_INBYTES", 7000], ["IPVS_STATS_ATTR_OUTBYTES", 6000]]


class FakeKernel:
    def __init__(self):
        self.services: dict[tuple, dict] = {}   # id -> options
        self.dests: dict[tuple, dict] = {}      # id -> {(addr, port, family): options}
        self.replies: collections.deque[bytes] = collections.deque()
        self.commands: list[int] = []           # every command received, in order
        self.datagrams = 0

    # -- the socket interface IPVS uses ----------------------------------------------

    def send(self, data: bytes) -> int:
        self.datagrams += 1
        off = 0
        while off < len(data):
            size, kind, flags, seq, _ = HEADER.unpack_from(data, off)
            assert kind == FAMILY
            msg = messages.ipvsmsg(data[off:off + size])
            msg.decode()
            self.commands.append(msg["cmd"])
            self._handle(msg, data[off:off + 16], flags, seq)
            off += (size + 3) & ~3
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        data = self.replies.popleft()
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass

    # -- the kernel side -------------------------------------------------------------

    def _handle(self, msg, header: bytes, flags: int, seq: int) -> None:
        cmd = msg["cmd"]
        if flags & NLM_F_DUMP == NLM_F_DUMP:
            self._dump(cmd, msg, seq)
            return
        code = self._change(cmd, msg)
        if code or flags & NLM_F_ACK:
            self.replies.append(HEADER.pack(36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + header)

    def _change(self, cmd: int, msg) -> int:
        svc_attr = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
        sid = _service_id(svc_attr)
        if cmd == messages.CMD_NEW_SERVICE:
            if sid in self.services:
                return errno.EEXIST
            self.services[sid] = {k: svc_attr.get_attr(k) for k in SVC_OPTIONS}
            self.dests[sid] = {}
            return 0
        if sid not in self.services:
            return errno.ESRCH
        if cmd == messages.CMD_SET_SERVICE:
            self.services[sid] = {k: svc_attr.get_attr(k) for k in SVC_OPTIONS}
        elif cmd == messages.CMD_DEL_SERVICE:
            del self.services[sid], self.dests[sid]
        else:
            dest_attr = msg.get_attr("IPVS_CMD_ATTR_DEST")
            did = (dest_attr.get_attr("IPVS_DEST_ATTR_ADDR"), dest_attr.get_attr("IPVS_DEST_ATTR_PORT"),
                   dest_attr.get_attr("IPVS_DEST_ATTR_ADDR_FAMILY"))
            dests = self.dests[sid]
            if cmd == messages.CMD_NEW_DEST:
                if did in dests:
                    return errno.EEXIST
                dests[did] = {k: dest_attr.get_attr(k) for k in DEST_OPTIONS}
            elif did not in dests:
                return errno.ENOENT
            elif cmd == messages.CMD_SET_DEST:
                dests[did] = {k: dest_attr.get_attr(k) for k in DEST_OPTIONS}
            else:
                del dests[did]
        return 0

    def _dump(self, cmd: int, msg, seq: int) -> None:
        if cmd == messages.CMD_GET_SERVICE:
            for sid, options in self.services.items():
                flags = options["IPVS_SVC_ATTR_FLAGS"]["flags"] | 0x2  # the kernel's own HASHED bit
                attrs = [*_service_attrs(sid),
                         *([k, v] for k, v in options.items() if k != "IPVS_SVC_ATTR_FLAGS"),
                         ["IPVS_SVC_ATTR_FLAGS", {"flags": flags, "mask": 0xFFFFFFFF}],
                         ["IPVS_SVC_ATTR_STATS", {"attrs": STATS}], ["IPVS_SVC_ATTR_STATS64", {"attrs": STATS}]]
                self._reply_nest(cmd, "IPVS_CMD_ATTR_SERVICE", attrs, seq)
        elif cmd == messages.CMD_GET_DEST:
            for (addr, port, family), options in self.dests.get(_service_id(msg.get_attr("IPVS_CMD_ATTR_SERVICE")),
                                                                {}).items():
                attrs = [["IPVS_DEST_ATTR_ADDR", addr], ["IPVS_DEST_ATTR_PORT", port],
                         *([k, v] for k, v in options.items()),
                         ["IPVS_DEST_ATTR_TUN_TYPE", 0], ["IPVS_DEST_ATTR_ACTIVE_CONNS", 3],
                         ["IPVS_DEST_ATTR_INACT_CONNS", 2], ["IPVS_DEST_ATTR_PERSIST_CONNS", 1],
                         ["IPVS_DEST_ATTR_ADDR_FAMILY", family],
                         ["IPVS_DEST_ATTR_STATS", {"attrs": STATS}], ["IPVS_DEST_ATTR_STATS64", {"attrs": STATS}]]
                self._reply_nest(cmd, "IPVS_CMD_ATTR_DEST", attrs, seq)
        self.replies.append(HEADER.pack(20, NLMSG_DONE, NLM_F_MULTI, seq, 0) + struct.pack("=i", 0))

    def _reply_nest(self, cmd: int, nest: str, attrs: list, seq: int) -> None:
        reply = messages.ipvsmsg()
        reply["attrs"] = [[nest, {"attrs": attrs}]]
        self._reply(reply, cmd, NLM_F_MULTI, seq)

    def _reply(self, reply, cmd: int, flags: int, seq: int) -> None:
        reply["cmd"] = cmd
        reply["version"] = 1
        reply["header"]["type"] = FAMILY
        reply["header"]["flags"] = flags
        reply["header"]["sequence_number"] = seq
        reply.encode()
        self.replies.append(reply.data)


def _service_id(svc_attr) -> tuple:
    fwmark = svc_attr.get_attr("IPVS_SVC_ATTR_FWMARK")
    af = svc_attr.get_attr("IPVS_SVC_ATTR_AF")
    if fwmark:
        return (af, "fwmark", fwmark)
    return (af, svc_attr.get_attr("IPVS_SVC_ATTR_PROTOCOL"), svc_attr.get_attr("IPVS_SVC_ATTR_ADDR"),
            svc_attr.get_attr("IPVS_SVC_ATTR_PORT"))


def _service_attrs(sid: tuple) -> list:
    if sid[1] == "fwmark":
        return [["IPVS_SVC_ATTR_AF", sid[0]], ["IPVS_SVC_ATTR_FWMARK", sid[2]]]
    return [["IPVS_SVC_ATTR_AF", sid[0]], ["IPVS_SVC_ATTR_PROTOCOL", sid[1]], ["IPVS_SVC_ATTR_ADDR", sid[2]],
            ["IPVS_SVC_ATTR_PORT", sid[3]]]
