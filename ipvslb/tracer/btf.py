"""Where the fields of a kernel struct are, from the running kernel's BTF.

The tracer's raw tracepoints receive a bare `struct sock *`, and bcc 0.26 cannot parse
<net/sock.h> of 6.12+, so the loader asks the kernel's own type information
(/sys/kernel/btf/vmlinux) where the fields are and passes their offsets to the BPF program.
libbpf, which bcc's library is built on, does the parsing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import NamedTuple

KIND_STRUCT, KIND_UNION = 4, 5
# typedef, volatile, const, restrict, type tag: names for another type
MODIFIERS = {8, 9, 10, 11, 18}


class BtfUnavailable(RuntimeError):
    """The kernel's BTF cannot be read; the message says why."""


class Field(NamedTuple):
    offset: int       # bytes from the start of the struct
    size: int         # bytes
    bitfield: bool    # a bitfield (or not byte-aligned): cannot be read as `size` whole bytes


class _Type(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _Member(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise BtfUnavailable(f"libbpf is not loadable ({err}): install libbpf1") from err
    lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
    lib.btf__load_vmlinux_btf.argtypes = []
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(_Type)
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__resolve_size.restype = ctypes.c_int64
    lib.btf__resolve_size.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__free.restype = None
    lib.btf__free.argtypes = [ctypes.c_void_p]
    return lib


class KernelTypes:
    """The running kernel's BTF. Use as a context manager, or call close()."""

    def __init__(self) -> None:
        self._lib = _libbpf()
        self._btf = self._lib.btf__load_vmlinux_btf()
        if not self._btf:
            code = ctypes.get_errno()
            raise BtfUnavailable(f"cannot read the kernel's BTF (/sys/kernel/btf/vmlinux): {os.strerror(code)}; "
                                 "the kernel needs CONFIG_DEBUG_INFO_BTF=y")

    def __enter__(self) -> KernelTypes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._btf:
            self._lib.btf__free(self._btf)
            self._btf = None

    def fields(self, struct: str) -> dict[str, Field]:
        """Every named field of `struct`, with the fields of its anonymous struct and union
        members lifted to its level (as C lets code name them)."""
        type_id = self._lib.btf__find_by_name_kind(self._btf, struct.encode(), KIND_STRUCT)
        if type_id < 0:
            raise BtfUnavailable(f"the kernel's BTF has no struct {struct}")
        return self._fields_of(type_id, 0)

    def _fields_of(self, type_id: int, base: int) -> dict[str, Field]:
        found: dict[str, Field] = {}
        t = self._lib.btf__type_by_id(self._btf, type_id).contents
        kind_flag, count = t.info >> 31, t.info & 0xFFFF
        members = (_Member * count).from_address(ctypes.addressof(t) + ctypes.sizeof(_Type))
        for m in members:
            # With kind_flag the offset packs the bitfield's width (top 8 bits) and bit offset.
            bits = m.offset & 0xFFFFFF if kind_flag else m.offset
            width = m.offset >> 24 if kind_flag else 0
            name = self._lib.btf__name_by_offset(self._btf, m.name_off).decode()
            if name:
                size = self._lib.btf__resolve_size(self._btf, m.type)
                found[name] = Field(base + bits // 8, size, bool(width) or bits % 8 != 0)
            elif self._kind(inner := self._skip_modifiers(m.type)) in (KIND_STRUCT, KIND_UNION):
                found.update(self._fields_of(inner, base + bits // 8))
        return found

    def _kind(self, type_id: int) -> int:
        return (self._lib.btf__type_by_id(self._btf, type_id).contents.info >> 24) & 0x1F

    def _skip_modifiers(self, type_id: int) -> int:
        while self._kind(type_id) in MODIFIERS:
            type_id = self._lib.btf__type_by_id(self._btf, type_id).contents.size_or_type
        return type_id
