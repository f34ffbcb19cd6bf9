"""Loads bpf/ipvslb.bpf.c with bcc and turns its ring-buffer records into ConnEvents.

No policy here: the tracer says what happened to which connection and through which
backend; the health engine decides what it means.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import select
import time
from collections.abc import Iterable
from pathlib import Path

from ipvslb.model import Endpoint, TracerSettings
from ipvslb.tracer import btf, conntable, paircounts, records, ringbuf
from ipvslb.tracer.records import ConnEvent

__all__ = ["Tracer", "TracerSettings", "TracerUnavailable"]

KPROBE = b"ip_vs_conn_new"
# Where IPVS rewrites an ICMP error coming back from a backend: the UDP unreachables.
ICMP_KPROBES = {b"ip_vs_nat_icmp": b"trace_ip_vs_nat_icmp", b"ip_vs_nat_icmp_v6": b"trace_ip_vs_nat_icmp_v6"}
# Where IPVS rewrites a masqueraded UDP packet, to the backend and back: the reply counts.
UDP_KPROBES = {b"udp_dnat_handler": b"trace_udp_dnat_handler", b"udp_snat_handler": b"trace_udp_snat_handler"}


class TracerUnavailable(RuntimeError):
    """BPF cannot be loaded here; the message says what to install or enable."""


def source_path() -> Path:
    candidates = [
        os.environ.get("IPVSLB_BPF_DIR"),
        Path(__file__).resolve().parents[2] / "bpf",  # source checkout
        "/usr/share/ipvslb/bpf",  # packages
    ]
    for directory in candidates:
        if directory and (Path(directory) / "ipvslb.bpf.c").exists():
            return Path(directory) / "ipvslb.bpf.c"
    raise TracerUnavailable("ipvslb.bpf.c not found (set IPVSLB_BPF_DIR or reinstall the package)")


# The fields of struct sock the BPF program reads, by the macro it knows them as: (struct,
# field, size it reads). Their offsets depend on the kernel's version and configuration.
SOCK_FIELDS = {
    "SKC_DADDR": ("sock_common", "skc_daddr", 4),
    "SKC_RCV_SADDR": ("sock_common", "skc_rcv_saddr", 4),
    "SKC_DPORT": ("sock_common", "skc_dport", 2),
    "SKC_FAMILY": ("sock_common", "skc_family", 2),
    "SKC_STATE": ("sock_common", "skc_state", 1),
    "SKC_V6_DADDR": ("sock_common", "skc_v6_daddr", 16),
    "SKC_V6_RCV_SADDR": ("sock_common", "skc_v6_rcv_saddr", 16),
    "SK_PROTOCOL": ("sock", "sk_protocol", 2),
    # The local port, kept after close (sock_common's skc_num is zeroed when the port is
    # released, before the socket enters CLOSE). struct inet_sock begins with its struct sock.
    "INET_SPORT": ("inet_sock", "inet_sport", 2),
}

HEAD_FIELDS = ("SKC_DADDR", "SKC_RCV_SADDR", "SKC_DPORT", "SKC_FAMILY", "SKC_STATE")
MAX_HEAD_LEN = 64


def layout_flags(structs: dict[str, dict[str, btf.Field]]) -> list[str]:
    """-D flags with the offsets in struct sock of SOCK_FIELDS, from the kernel's fields of
    struct sock, sock_common and inet_sock (btf.KernelTypes.fields)."""
    common = structs["sock"].get("__sk_common")
    if common is None:
        raise TracerUnavailable("struct sock has no __sk_common in this kernel's BTF")
    if getattr(structs["inet_sock"].get("sk"), "offset", None) != 0:
        raise TracerUnavailable("struct inet_sock does not begin with its struct sock in this kernel's BTF")
    flags, ends = [], {}
    for macro, (struct, name, size) in SOCK_FIELDS.items():
        field = structs[struct].get(name)
        if field is None:
            raise TracerUnavailable(f"struct {struct} has no field {name} in this kernel's BTF")
        if field.size != size or field.bitfield:
            shape = "a bitfield" if field.bitfield else f"{field.size} bytes"
            why = " (a bitfield before Linux 5.6: older kernels are not supported)" if field.bitfield else ""
            raise TracerUnavailable(f"struct {struct}.{name} is {shape} in this kernel; the tracer reads "
                                    f"{size} bytes{why}")
        offset = field.offset + (common.offset if struct == "sock_common" else 0)
        flags.append(f"-D{macro}={offset}")
        ends[macro] = offset + size
    # The program reads these at every event, as one block from the start of the socket.
    head = max(ends[macro] for macro in HEAD_FIELDS)
    if head > MAX_HEAD_LEN:
        raise TracerUnavailable(f"struct sock's addresses, ports, family and state end at byte {head} in this "
                                f"kernel; the tracer reads at most {MAX_HEAD_LEN} bytes at once")
    flags.append(f"-DSK_HEAD_LEN={(head + 7) // 8 * 8}")
    return flags


# The fields of struct sk_buff the ICMP kprobes read to find the error's type and code.
SKB_FIELDS = {"SKB_HEAD": ("head", 8), "SKB_NETWORK_HEADER": ("network_header", 2)}


def skb_flags(fields: dict[str, btf.Field]) -> list[str]:
    """-D flags with the offsets of SKB_FIELDS, from the kernel's fields of struct sk_buff."""
    flags = []
    for macro, (name, size) in SKB_FIELDS.items():
        field = fields.get(name)
        if field is None or field.size != size or field.bitfield:
            raise TracerUnavailable(f"struct sk_buff.{name} is not a field of {size} bytes in this kernel's BTF")
        flags.append(f"-D{macro}={field.offset}")
    return flags


def sock_layout() -> list[str]:
    """layout_flags() and skb_flags() for the running kernel."""
    try:
        with btf.KernelTypes() as types:
            return (layout_flags({struct: types.fields(struct) for struct in ("sock", "sock_common", "inet_sock")})
                    + skb_flags(types.fields("sk_buff")))
    except btf.BtfUnavailable as err:
        raise TracerUnavailable(str(err)) from err


# The structs the program shares with records.py, by the macro the program checks each one's
# size against (_Static_assert): a layout changed on one side only fails the compile.
SHARED_STRUCTS = {"RECORD_SIZE": records.RECORD, "PAIR_SIZE": records.PAIR, "PAIR_STATS_SIZE": records.PAIR_STATS,
                  "VIP_KEY_SIZE": records.VIP_KEY,
                  "UDP_STATS_SIZE": records.UDP_STATS}


def size_flags() -> list[str]:
    """-D flags with the sizes records.py decodes and encodes the shared structs with."""
    return [f"-D{macro}={layout.size}" for macro, layout in SHARED_STRUCTS.items()]


def _recursion_misses(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("recursion_misses:"):
            return int(line.split()[1])
    return 0


class _KernelSlots:
    """The `pair_slots` map as PairCounts writes it: struct pair bytes -> slot number."""

    def __init__(self, table):
        self._table = table

    def __setitem__(self, key: bytes, slot: int) -> None:
        self._table[self._table.Key.from_buffer_copy(key)] = ctypes.c_uint32(slot)

    def __delitem__(self, key: bytes) -> None:
        del self._table[self._table.Key.from_buffer_copy(key)]


class Tracer:
    """One loaded BPF program. `attribution` is "kprobe" when IPVS's own choice of backend is
    traced, "conntable" when the kprobe could not attach and /proc/net/ip_vs_conn is read.

    Without the kprobe there is no CONNECT record (the client port is only known once the
    SYN is out), so the adaptive connect deadline has nothing to time; SYN retransmits,
    resets, establishment and closes are still reported and attributed."""

    def __init__(self, settings: TracerSettings | None = None, use_kprobe: bool = True):
        settings = settings or TracerSettings()
        try:
            from bcc import BPF
        except ImportError as err:
            raise TracerUnavailable(f"bcc is not importable ({err}): install python3-bpfcc") from err
        from ipvslb import preflight

        if problem := preflight.headers(os.uname().release):
            raise TracerUnavailable(problem)
        pages = 1 << max(0, settings.ring_buffer_pages - 1).bit_length()
        # -w: kernel headers warn under bcc's clang; operators cannot act on those warnings.
        cflags = ["-w", f"-DCAPACITY={settings.connection_capacity}", f"-DRINGBUF_PAGES={pages}",
                  *size_flags(), *sock_layout()]
        started = time.monotonic()
        try:
            self.bpf = BPF(src_file=str(source_path()).encode(), cflags=cflags)
        except Exception as err:  # bcc raises bare Exception on compile/load failures
            raise TracerUnavailable(f"cannot load the BPF program: {err}") from err
        self.compile_seconds = time.monotonic() - started
        self.attribution = "none"
        # Whether ICMP unreachables from UDP backends are reported (kprobes, like attribution).
        self.udp_unreachables = False
        if use_kprobe:
            self._attach_kprobe()
        else:
            self.use_conntable()
        # Whether UDP packets are counted here per (VIP, backend) (udp_counts); without these
        # kprobes the daemon reads IPVS's own counters, which lag by up to 2 s.
        self.udp_counting = self._attach_all(UDP_KPROBES)
        ring_fd = self.bpf[b"records"].map_fd
        self._ring = ringbuf.RingBuffer(ring_fd, pages * mmap.PAGESIZE, records.RECORD.size)
        # The ring buffer's own fd polls readable whenever any record is unread, so a loop
        # waiting on it would spin on the routine records that are meant to wait for the
        # next read. Edge-triggered, this epoll reports only the kernel's wakeups.
        self._wakeups = select.epoll()
        self._wakeups.register(ring_fd, select.EPOLLIN | select.EPOLLET)
        counts = self.bpf[b"pair_counts"]
        size = len(counts) * records.PAIR_STATS.size
        self._counts_map = mmap.mmap(counts.map_fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE,
                                     mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._pair_counts = paircounts.PairCounts(_KernelSlots(self.bpf[b"pair_slots"]),
                                                  memoryview(self._counts_map), len(counts))
        self.set_report_closed(settings.report_closed)
        self.set_wakeup_interval(settings.wakeup_interval)
        self.set_sample_interval(settings.sample_interval)
        self._vips: set[bytes] = set()
        self._ports: set[int] = set()
        self._keys: dict[int, tuple[records.Traced, bytes]] = {}  # id -> (service, its key)

    def _attach_kprobe(self) -> None:
        try:
            self.bpf.attach_kprobe(event=KPROBE, fn_name=b"trace_ip_vs_conn_new")
        except Exception:  # kprobes disabled, or the symbol is missing/inlined
            self.use_conntable()
            return
        self.attribution = "kprobe"
        if self.udp_unreachables:
            return  # attached once already (use_conntable leaves them): twice would double each record
        for event, fn in ICMP_KPROBES.items():
            try:
                self.bpf.attach_kprobe(event=event, fn_name=fn)
            except Exception:  # missing (IPVS without IPv6): UDP keeps the reply window and probes
                continue
            self.udp_unreachables = True

    def _attach_all(self, kprobes: dict[bytes, bytes]) -> bool:
        try:
            for event, fn in kprobes.items():
                self.bpf.attach_kprobe(event=event, fn_name=fn)
        except Exception:  # kprobes disabled, or a symbol missing: none or all of them
            for event in kprobes:
                try:
                    self.bpf.detach_kprobe(event=event)
                except Exception:  # was not attached
                    pass
            return False
        return True

    def use_conntable(self) -> None:
        """Attribute backends from the IPVS connection table instead of the kprobe."""
        if self.attribution == "kprobe":
            self.bpf.detach_kprobe(event=KPROBE)
        self.attribution = "conntable"

    def set_vips(self, services: Iterable[records.Traced]) -> None:
        """Trace exactly these services (model.Service, or records.Vip) from now on."""
        # Their map keys by identity: a reload passes the same unchanged model.Service
        # objects again, and packing hundreds of keys is a step per service per reload.
        known, keys = self._keys, {}
        for svc in services:
            hit = known.get(id(svc))
            keys[id(svc)] = hit if hit is not None and hit[0] is svc else (svc, records.vip_key(svc.protocol, svc.vip,
                                                                                                    svc.port))
        self._keys = keys
        wanted = {key for _, key in keys.values()}
        ports = {svc.port for svc, _ in keys.values() if svc.protocol == "tcp"}
        port_table = self.bpf[b"vip_ports"]
        for port in ports - self._ports:
            port_table[ctypes.c_int(port)] = ctypes.c_uint8(1)
        table = self.bpf[b"vips"]
        gone = self._vips - wanted
        for key in gone:
            del table[table.Key.from_buffer_copy(key)]
        for key in wanted - self._vips:
            table[table.Key.from_buffer_copy(key)] = ctypes.c_uint8(1)
        for port in self._ports - ports:
            port_table[ctypes.c_int(port)] = ctypes.c_uint8(0)
        if gone:  # (a reload that only adds services has nothing more to free)
            # Free the count slots of services no longer traced (they are bounded).
            self._pair_counts.forget(lambda protocol, vip: records.vip_key(protocol, *vip) not in gone)
            udp = self.bpf[b"udp_counts"]
            for key in list(udp.keys()):
                protocol, vip, _backend = records.decode_pair(bytes(key))
                if records.vip_key(protocol, *vip) in gone:
                    del udp[key]
        self._vips, self._ports = wanted, ports

    def fileno(self) -> int:
        """A descriptor that polls readable when the kernel wakes the reader: at once for
        failure evidence, at most once per `wakeup_interval` for routine records. A reader
        whose last read returned records must read again within that interval instead of
        waiting here: the records that followed the last wakeup do not announce themselves."""
        return self._wakeups.fileno()

    def read(self, timeout_ms: int = 0) -> list[ConnEvent]:
        """Everything recorded so far, after waiting up to timeout_ms for a wakeup."""
        self._wakeups.poll(timeout_ms / 1000)  # also clears the wakeup fileno() reported
        runs = self._ring.drain()
        batch = records.decode_slots(runs[0] if len(runs) == 1 else b"".join(runs))
        if self.attribution == "conntable" and any(e.backend is None for e in batch):
            table = conntable.read()
            batch = [e.with_backend(table.get((e.protocol, e.client, e.vip))) if e.backend is None else e
                     for e in batch]
        if self.sample_interval:
            self._pair_counts.learn(batch)
        return batch

    def set_report_closed(self, on: bool) -> None:
        """Whether connections stay tracked after establishment to report their close."""
        self.bpf[b"options"][ctypes.c_int(0)] = ctypes.c_uint32(1 if on else 0)

    def set_wakeup_interval(self, seconds: float) -> None:
        """How often at most routine records wake the reader (0: every record)."""
        self.wakeup_interval = seconds
        self.bpf[b"options"][ctypes.c_int(1)] = ctypes.c_uint32(round(seconds * 1_000_000))

    def set_sample_interval(self, seconds: float) -> None:
        """Per (VIP, backend), time one connect per interval with CONNECT and ESTABLISHED
        records and only count the others that succeed (0: report every connect)."""
        self.sample_interval = seconds
        self.bpf[b"options"][ctypes.c_int(2)] = ctypes.c_uint32(round(seconds * 1_000_000))

    def counted(self) -> list[records.Counted]:
        """Successes counted in the kernel rather than reported, per (VIP, backend).
        Counts only grow; a reader takes the difference from its last call."""
        return self._pair_counts.read()

    def udp_counts(self) -> dict[tuple[Endpoint, Endpoint], tuple[int, int]]:
        """(VIP, backend) -> (UDP packets sent to the backend, packets back from it), counted
        since the VIP was traced; empty unless `udp_counting`."""
        counts = {}
        for key, value in self.bpf[b"udp_counts"].items():
            _protocol, vip, backend = records.decode_pair(bytes(key))
            counts[(vip, backend)] = (value.sent, value.received)
        return counts

    def lost_records(self) -> int:
        return int(self.bpf[b"lost"].sum(0).value)

    def missed_runs(self) -> int:
        """Times the kernel skipped one of the tracer's programs because it was already running
        on that CPU (the raw tracepoints) or any kprobe or tracepoint program was (the kprobe)
        (fdinfo recursion_misses: kernels before 6.7 do not count a kprobe's skips).
        A skipped transition to ESTABLISHED is caught later (ESTABLISHED_UNTIMED); a skipped
        reset or close loses that one piece of evidence."""
        return sum(_recursion_misses(function.fd) for function in self.bpf.funcs.values())

    def close(self) -> None:
        self._wakeups.close()
        self._ring.close()
        self._pair_counts.release()
        self._counts_map.close()
        self.bpf.cleanup()
