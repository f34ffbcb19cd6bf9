"""The start-up refusals of `ipvslb run`, on a fake /proc, /sys, /lib/modules and bpf()."""
from __future__ import annotations

import errno
import shutil
import socket

import pytest

from ipvslb import cli, preflight

RELEASE = "6.1.0-50-amd64"


@pytest.fixture
def host(tmp_path):
    """A host with everything: headers, ip_vs loaded, bcc importable, bpf() working."""
    proc, modules = tmp_path / "proc", tmp_path / "modules"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "ip_vs").write_text("IP Virtual Server version 1.2.1\n")
    # Debian's layout: the architecture's tree at `build`, the -common one at `source`.
    headers = tmp_path / "usr/src" / f"linux-headers-{RELEASE}"
    common = tmp_path / "usr/src" / "linux-headers-6.1.0-50-common"
    for tree, files in ((headers, preflight.BUILD_FILES), (common, preflight.SOURCE_FILES)):
        for name in files:
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_text("/* */\n")
    (modules / RELEASE).mkdir(parents=True)
    (modules / RELEASE / "build").symlink_to(headers)
    (modules / RELEASE / "source").symlink_to(common)
    (modules / RELEASE / "modules.dep").write_text(
        "kernel/net/netfilter/ipvs/ip_vs.ko: kernel/net/netfilter/nf_conntrack.ko\n"
        "kernel/net/netfilter/ipvs/ip_vs_rr.ko: kernel/net/netfilter/ipvs/ip_vs.ko\n")
    sysfs = tmp_path / "sys"
    (sysfs / "kernel" / "btf").mkdir(parents=True)
    (sysfs / "kernel" / "btf" / "vmlinux").write_bytes(b"\x9f\xeb")
    kw = dict(release=RELEASE, proc=proc, modules=modules, bpf_probe=lambda: None,
              find_spec=lambda name: object(), sysfs=sysfs)
    return tmp_path, kw


def test_a_complete_host_has_no_problems(host):
    _, kw = host
    assert preflight.problems(**kw) == []


def test_missing_headers_name_the_package_for_the_running_kernel(host):
    root, kw = host
    (root / "modules" / RELEASE / "build").unlink()
    [problem] = preflight.problems(**kw)
    assert f"install linux-headers-{RELEASE}" in problem
    assert f"kernel-devel-{RELEASE}" in problem


def test_a_dangling_build_link_counts_as_missing_headers(host):
    root, kw = host
    shutil.rmtree(root / "usr/src" / f"linux-headers-{RELEASE}")
    [problem] = preflight.problems(**kw)
    assert problem.startswith(f"kernel headers for {RELEASE} are missing or incomplete "
                              f"({root}/modules/{RELEASE}/build is missing): (re)install linux-headers-{RELEASE}")


@pytest.mark.parametrize("tree, name", [("linux-headers-6.1.0-50-amd64", "include/generated/autoconf.h"),
                                        ("linux-headers-6.1.0-50-amd64", "Makefile"),
                                        ("linux-headers-6.1.0-50-common", "include/linux/kconfig.h")])
def test_an_incomplete_headers_tree_is_named_with_the_missing_file(host, tree, name):
    root, kw = host
    (root / "usr/src" / tree / name).unlink()
    [problem] = preflight.problems(**kw)
    where = "build" if tree.endswith("amd64") else "source"
    assert problem == (f"kernel headers for {RELEASE} are missing or incomplete ({root}/modules/{RELEASE}/build "
                       f"lacks {root}/modules/{RELEASE}/{where}/{name}): (re)install linux-headers-{RELEASE} "
                       f"(Debian) or kernel-devel-{RELEASE} (RPM); bcc compiles the tracer against them")


def test_one_tree_without_source_link_is_complete(host):
    """RPM's kernel-devel: everything in the build tree, no `source` beside it."""
    root, kw = host
    (root / "modules" / RELEASE / "source").unlink()
    build = root / "usr/src" / f"linux-headers-{RELEASE}"
    assert preflight.headers(RELEASE, kw["modules"]) is not None  # kconfig.h nowhere yet
    (build / "include/linux").mkdir(parents=True)
    (build / "include/linux/kconfig.h").write_text("/* */\n")
    assert preflight.problems(**kw) == []


def test_the_tracer_uses_the_same_headers_check():
    import inspect

    from ipvslb import tracer

    assert "preflight.headers(" in inspect.getsource(tracer.Tracer.__init__)
    assert "linux-headers" not in inspect.getsource(tracer)


def test_ip_vs_not_loaded_but_available_as_a_module_is_fine(host):
    root, kw = host
    (root / "proc/net/ip_vs").unlink()
    assert preflight.problems(**kw) == []


def test_ip_vs_built_in_is_fine(host):
    root, kw = host
    (root / "proc/net/ip_vs").unlink()
    (root / "modules" / RELEASE / "modules.dep").write_text("kernel/net/netfilter/ipvs/ip_vs_rr.ko:\n")
    (root / "modules" / RELEASE / "modules.builtin").write_text("kernel/net/netfilter/ipvs/ip_vs.ko\n")
    assert preflight.problems(**kw) == []


def test_no_ip_vs_anywhere_says_what_to_install(host):
    root, kw = host
    (root / "proc/net/ip_vs").unlink()
    # ip_vs_rr alone must not pass for ip_vs.
    (root / "modules" / RELEASE / "modules.dep").write_text("kernel/net/netfilter/ipvs/ip_vs_rr.ko:\n")
    [problem] = preflight.problems(**kw)
    assert problem.startswith("IPVS is unavailable")
    assert f"linux-image-{RELEASE}" in problem and "CONFIG_IP_VS" in problem


def test_no_modules_directory_at_all_is_no_ip_vs(host):
    root, kw = host
    (root / "proc/net/ip_vs").unlink()
    kw["modules"] = root / "nowhere"
    problems = preflight.problems(**kw)
    assert problems[0].startswith("IPVS is unavailable")


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSYS, "CONFIG_BPF_SYSCALL"),
    (errno.EPERM, "CAP_BPF"),
    (errno.EACCES, "CAP_SYS_ADMIN"),
    (errno.EINVAL, "EINVAL"),
])
def test_bpf_refusals_say_what_to_enable(host, code, expected):
    _, kw = host
    kw["bpf_probe"] = lambda: code
    [problem] = preflight.problems(**kw)
    assert "BPF is" in problem and expected in problem


def test_missing_bcc_names_both_distributions_packages(host):
    _, kw = host
    kw["find_spec"] = lambda name: None
    [problem] = preflight.problems(**kw)
    assert "python3-bpfcc" in problem and "python3-bcc" in problem


def test_a_kernel_without_btf_is_named_with_the_option_it_needs(host):
    root, kw = host
    (root / "sys/kernel/btf/vmlinux").unlink()
    [problem] = preflight.problems(**kw)
    assert problem.startswith(f"the kernel has no BTF ({root}/sys/kernel/btf/vmlinux)")
    assert "CONFIG_DEBUG_INFO_BTF=y" in problem


def test_problems_come_most_basic_first(host):
    root, kw = host
    (root / "proc/net/ip_vs").unlink()
    (root / "modules" / RELEASE / "modules.dep").unlink()
    (root / "modules" / RELEASE / "build").unlink()
    kw["bpf_probe"] = lambda: errno.EPERM
    problems = preflight.problems(**kw)
    assert [p.split(" ", 2)[:2] for p in problems] == [["IPVS", "is"], ["BPF", "is"], ["kernel", "headers"]]


def test_the_real_bpf_probe_returns_an_errno_or_none():
    # Unprivileged or in a sandbox this is EPERM; as root on a BPF kernel, None.
    assert preflight.bpf() is None or "BPF is" in preflight.bpf()


def test_run_refuses_with_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(preflight, "problems", lambda: ["first problem", "second problem"])
    from ipvslb import daemon

    monkeypatch.setattr(daemon, "main", lambda path: pytest.fail("the daemon started"))
    assert cli.main(["run", "--config", "/nonexistent.yaml"]) == 1
    err = capsys.readouterr().err
    assert err == "ipvslb: cannot start: first problem\n"


# --- what the settings name, checked before the tracer compile -----------------------------

def test_a_writable_state_dir_is_made_and_passes(tmp_path):
    assert preflight.state_dir(str(tmp_path / "a" / "state")) is None
    assert (tmp_path / "a" / "state").is_dir() and list((tmp_path / "a" / "state").iterdir()) == []


def test_a_state_dir_that_cannot_be_made_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    problem = preflight.state_dir(str(tmp_path / "file" / "state"))
    assert problem == (f"state directory {tmp_path}/file/state is not writable (Not a directory): set "
                       "settings.state_dir to a writable directory (the packaged unit lets the daemon write "
                       "/var/lib/ipvslb)")


def test_a_read_only_state_dir_is_refused():
    # /proc/sys is read-only for files that are not sysctls, as root too.
    assert "is not writable" in preflight.state_dir("/proc/sys")


def test_a_status_socket_path_holding_a_file_is_refused(tmp_path):
    (tmp_path / "s.sock").write_text("x")
    assert "a file that is not a socket" in preflight.status_socket(str(tmp_path / "s.sock"))
    assert preflight.status_socket(str(tmp_path / "sub" / "s.sock")) is None
    assert "directory /proc/sys is not writable" in preflight.status_socket("/proc/sys/s.sock")


def test_a_metrics_port_in_use_is_one_sentence():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        problem = preflight.metrics_address(f"127.0.0.1:{port}")
    assert problem == (f"cannot listen on settings.metrics_address 127.0.0.1:{port} (Address already in use): "
                       "another process listens there or the address is not this host's; choose another, or '' "
                       "for no metrics")
    assert preflight.metrics_address(f"127.0.0.1:{port}") is None  # released again
    assert preflight.metrics_address("") is None
    assert "Cannot assign requested address" in preflight.metrics_address("192.0.2.1:9742")
