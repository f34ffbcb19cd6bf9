"""Start-up checks of `ipvslb run`: what the host must provide before the daemon can work.

Each check returns None or one sentence that names what to install or enable. They run
before anything is opened, so that a host without kernel headers, ip_vs or BPF gets that
sentence (and a non-zero exit) instead of a bcc compile error or a netlink traceback.

Reads files and makes one bpf() call; runs no programs. Everything the checks look at is a
parameter, so the unit tests give them a fake /proc, /sys, /lib/modules and bpf().
"""
from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import platform
import struct
from collections.abc import Callable
from pathlib import Path

# bpf(2) has no libc wrapper; its number differs per architecture (the package is
# Architecture: all). An unknown machine skips the probe and leaves the verdict to bcc.
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "i686": 357, "i386": 357, "armv7l": 386, "ppc64le": 361,
               "s390x": 351, "riscv64": 280, "loongarch64": 280}
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2

# (errno or None) from one bpf() call; None when the call succeeded.
BpfProbe = Callable[[], "int | None"]


def btf(sysfs: Path = Path("/sys")) -> str | None:
    vmlinux = sysfs / "kernel" / "btf" / "vmlinux"
    if vmlinux.exists():
        return None
    return (f"the kernel has no BTF ({vmlinux}): the tracer finds struct sock's fields there; "
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, Fedora and RHEL kernels are)")


def headers(release: str, modules: Path = Path("/lib/modules")) -> str | None:
    build = modules / release / "build"
    # exists() follows the link: linux-headers removed after the image leaves it dangling.
    if build.exists():
        return None
    return (f"kernel headers for {release} are missing ({build}): install linux-headers-{release} "
            f"(Debian) or kernel-devel-{release} (RPM); bcc compiles the tracer against them")


def ip_vs(release: str, proc: Path = Path("/proc"), modules: Path = Path("/lib/modules")) -> str | None:
    if (proc / "net" / "ip_vs").exists():  # loaded or built in
        return None
    # Not loaded yet is fine when the module is there: the kernel loads it on the daemon's
    # first IPVS netlink request (alias net-pf-16-proto-16-family-IPVS), no CAP_SYS_MODULE.
    for index in ("modules.dep", "modules.builtin"):
        try:
            text = (modules / release / index).read_text(errors="replace")
        except OSError:
            continue
        if any(line.split(":", 1)[0].rsplit("/", 1)[-1].startswith("ip_vs.ko") for line in text.splitlines()):
            return None
    return (f"IPVS is unavailable: ip_vs is neither loaded nor a module of kernel {release}: install that "
            f"kernel's modules (linux-image-{release} on Debian, kernel-modules-{release} on RPM) or use a "
            "kernel with CONFIG_IP_VS (in a container: `modprobe ip_vs` on the host)")


def bcc_module(find_spec: Callable = importlib.util.find_spec) -> str | None:
    if find_spec("bcc") is not None:
        return None
    return "bcc's Python module is missing: install python3-bpfcc (Debian) or python3-bcc (RPM)"


def bpf(probe: BpfProbe | None = None) -> str | None:
    probe = probe or _bpf_map_create
    code = probe()
    if code is None:
        return None
    if code == errno.ENOSYS:
        return ("BPF is unavailable: the kernel has no bpf() system call; boot a kernel built with "
                "CONFIG_BPF_SYSCALL=y (all Debian and RHEL kernels are)")
    if code in (errno.EPERM, errno.EACCES):
        return (f"BPF is not permitted ({errno.errorcode[code]} from bpf()): run as root with CAP_BPF, "
                "CAP_PERFMON and CAP_SYS_ADMIN (the packaged ipvslb.service grants them) and allow the "
                "bpf() system call; in a container, run it privileged")
    return f"BPF is unavailable: bpf() failed with {errno.errorcode.get(code, code)}"


def _bpf_map_create() -> int | None:
    """Create and close a one-entry array map: the cheapest call that needs what bcc needs."""
    number = BPF_SYSCALL.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, the
    # rest zero (the kernel rejects non-zero bytes it does not know).
    attr = ctypes.create_string_buffer(struct.pack("=IIII", BPF_MAP_TYPE_ARRAY, 4, 4, 1), 128)
    fd = libc.syscall(ctypes.c_long(number), ctypes.c_int(BPF_MAP_CREATE), attr, ctypes.c_uint(len(attr)))
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return None


def problems(release: str | None = None, proc: Path = Path("/proc"), modules: Path = Path("/lib/modules"),
             bpf_probe: BpfProbe | None = None, find_spec: Callable = importlib.util.find_spec,
             sysfs: Path = Path("/sys")) -> list[str]:
    """Every missing precondition, the most basic first."""
    release = release or os.uname().release
    found = [ip_vs(release, proc, modules), bpf(bpf_probe), btf(sysfs), bcc_module(find_spec),
             headers(release, modules)]
    return [p for p in found if p is not None]
