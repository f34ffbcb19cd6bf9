"""The start-up refusals of `ipvslb run`, on a fake /proc, /sys, /lib/modules and bpf()."""
from __future__ import annotations

import errno

import pytest

from ipvslb import cli, preflight

RELEASE = "6.1.0-50-amd64"


@pytest.fixture
def host(tmp_path):
    """A host with everything: headers, ip_vs loaded, bcc importable, bpf() working."""
    proc, modules = tmp_path / "proc", tmp_path / "modules"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "ip_vs").write_text("IP Virtual Server version 1.2.1\n")
    headers = tmp_path / "usr/src" / f"linux-headers-{RELEASE}"
    headers.mkdir(parents=True)
    (modules / RELEASE).mkdir(parents=True)
    (modules / RELEASE / "build").symlink_to(headers)
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
    (root / "usr/src" / f"linux-headers-{RELEASE}").rmdir()
    [problem] = preflight.problems(**kw)
    assert problem.startswith(f"kernel headers for {RELEASE} are missing")


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
