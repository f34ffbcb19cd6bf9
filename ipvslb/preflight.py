"""Start-up checks of `ipvslb run`: what the host must provide before the daemon can work.

Each check returns None or one sentence that names what to install or enable. They run
before anything is opened, so that a host without kernel headers, ip_vs or BPF gets that
sentence (and a non-zero exit) instead of a bcc compile error or a netlink traceback.

Reads files and makes one bpf() call; runs no programs. Everything the checks look at is a
parameter, so the unit tests give them a fake /proc, /sys, /lib/modules and bpf().

`settings_problem` checks what the configuration names (state directory, status socket,
metrics address) before the tracer compile, which takes seconds to minutes: a daemon that
would stop on them afterwards would recompile at every systemd restart.
"""
from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import platform
import socket
import struct
import tempfile
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


# What bcc's compile needs of the headers tree, relative to `build` (the configuration as a
# header, the top Makefile every kernel build tree has) and to
# `source`, which Debian splits into linux-headers-*-common (RPM's kernel-devel has one
# tree, `source` absent or pointing at `build`).
BUILD_FILES = ("Makefile", "include/generated/autoconf.h")
SOURCE_FILES = ("include/linux/kconfig.h",)


def headers(release: str, modules: Path = Path("/lib/modules")) -> str | None:
    """The one check of the kernel headers, also used by the tracer (`ipvslb events` runs
    no preflight)."""
    build = modules / release / "build"
    source = modules / release / "source"
    if not source.exists():
        source = build / "source" if (build / "source").exists() else build
    # exists() follows the link: linux-headers removed after the image leaves it dangling.
    if not build.exists():
        found = f"{build} is missing"
    else:
        absent = [build / name for name in BUILD_FILES if not (build / name).is_file()]
        absent += [source / name for name in SOURCE_FILES
                   if not (source / name).is_file() and not (build / name).is_file()]
        if not absent:
            return None
        found = f"{build} lacks {', '.join(map(str, absent))}"
    return (f"kernel headers for {release} are missing or incomplete ({found}): (re)install "
            f"linux-headers-{release} (Debian) or kernel-devel-{release} (RPM); bcc compiles the tracer "
            "against them")


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


def state_dir(path: str) -> str | None:
    """The directory exists or can be made, and takes a new file (a read-only mount, such
    as the packaged unit's ProtectSystem=strict outside its StateDirectory=, does not)."""
    if (err := _unwritable(path, 0o700)) is not None:
        return (f"state directory {path} is not writable ({err}): set settings.state_dir to a "
                "writable directory (the packaged unit lets the daemon write /var/lib/ipvslb)")
    return None


def _unwritable(directory: str, mode: int) -> str | None:
    """Why `directory` cannot be made or take a new file, or None when it can."""
    try:
        os.makedirs(directory, mode=mode, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return str(err.strerror or err)
    return None


def status_socket(path: str, setting: str = "status_socket") -> str | None:
    """Also the control socket's check (`setting` control_socket)."""
    from ipvslb import status

    parent = os.path.dirname(path)
    if (err := _unwritable(parent, 0o755)) is not None:
        return (f"{setting.replace('_', ' ')} {path}: directory {parent} is not writable ({err}): set "
                f"settings.{setting} to a writable place (the packaged unit lets the daemon write /run/ipvslb)")
    return status.path_problem(path, setting)


def metrics_address(address: str) -> str | None:
    """The address can be listened on: bound once and released (the HTTP server binds it
    again, with SO_REUSEADDR as here)."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
    except OSError as err:
        return (f"cannot listen on settings.metrics_address {address} ({err.strerror or err}): another process "
                "listens there or the address is not this host's; choose another, or '' for no metrics")
    return None


def settings_problem(settings) -> str | None:
    """The first problem with what the configuration's settings name, or None."""
    for problem in (state_dir(settings.state_dir), status_socket(settings.status_socket),
                    status_socket(settings.control_path(), "control_socket"),
                    metrics_address(settings.metrics_address)):
        if problem:
            return problem
    return None


def problems(release: str | None = None, proc: Path = Path("/proc"), modules: Path = Path("/lib/modules"),
             bpf_probe: BpfProbe | None = None, find_spec: Callable = importlib.util.find_spec,
             sysfs: Path = Path("/sys")) -> list[str]:
    """Every missing precondition, the most basic first."""
    release = release or os.uname().release
    found = [ip_vs(release, proc, modules), bpf(bpf_probe), btf(sysfs), bcc_module(find_spec),
             headers(release, modules)]
    return [p for p in found if p is not None]
