"""The VM runner's summary: CI shows only the tail of a long log, so each failure's
assertion lines must be repeated there."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("run_vm", Path(__file__).parents[2] / "testbed" / "run_vm.py")
run_vm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_vm)

LOG = """\
tests/kernel/test_a.py::test_ok PASSED [ 33%]
tests/kernel/test_a.py::test_bad[fd90::1] FAILED [ 66%]
tests/kernel/test_b.py::test_broken_fixture ERROR [100%]
==================================== ERRORS ====================================
___________________ ERROR at setup of test_broken_fixture ______________________
    def topo():
>       raise RuntimeError("no veth")
E       RuntimeError: no veth
=================================== FAILURES ===================================
_ test_bad[fd90::1] _
    def test_bad(vip):
>       assert ports() == {"a": True}
E       AssertionError: assert {'a': False} == {'a': True}
E         Differing items:
----------------------------- Captured stdout call -----------------------------
E  this is the test's own output, not pytest's
==================================== PASSES ====================================
___________________________________ test_ok ____________________________________
E       not a failure: a passing test's captured output
=========================== short test summary info ============================
PASSED tests/kernel/test_a.py::test_ok
FAILED tests/kernel/test_a.py::test_bad[fd90::1] - AssertionError: assert {'a...
ERROR tests/kernel/test_b.py::test_broken_fixture - RuntimeError: no veth
"""


def test_each_failure_is_followed_by_its_assertion_lines():
    assert run_vm.failure_lines(LOG) == [
        "FAILED tests/kernel/test_a.py::test_bad[fd90::1] - AssertionError: assert {'a...",
        "  E       AssertionError: assert {'a': False} == {'a': True}",
        "  E         Differing items:",
        "ERROR tests/kernel/test_b.py::test_broken_fixture - RuntimeError: no veth",
        "  E       RuntimeError: no veth",
    ]


def test_the_assertion_lines_per_failure_are_capped():
    many = LOG.replace("E         Differing items:\n", "E         more\n" * 50)
    lines = run_vm.failure_lines(many, per_failure=3)
    assert len([line for line in lines if line.startswith("  E")]) == 3 + 1


# What vng printed for a guest that died while the benchmark attached the tracer (6.12,
# 2026-11-27), shortened.
CONSOLE = run_vm.VmEnd("vng exit code 255", False, [
    "[    7.399382] IPVS: ipvs loaded.",
    "[  115.333903] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
    "[  115.334158] CPU: 0 UID: 0 PID: 214 Comm: python3 Not tainted 6.12.117+deb13-amd64 #1",
    "[  115.334281] RIP: 0010:inet_sk_state_store+0x15/0x70",
    "[  115.334481] Code: 00 00 00 00 00 90 90 90 90 90 90 90 90 90 90 90 90 90 90 90 90 66 0f 1f 00 0f 1f 44 "
    "00 00 55 89 f5 53 48 89 fb 0f b6 57 12 66 <90> 40 88 6b 12 5b 5d c3 cc cc cc cc 65 8b 05 d4 82 0d 65 48 0f a3",
    "[  115.335298]  tcp_disconnect+0x48d/0x610",
    "[  115.336558] RIP: 0010:inet_sk_state_store+0x15/0x70",
    "[  115.336739] Kernel panic - not syncing: Fatal exception in interrupt",
    "[  115.341948] Kernel Offset: 0x19400000 from 0xffffffff81000000",
])


def test_a_guest_kernel_crash_is_named_by_its_oops_where_and_panic():
    assert run_vm.guest_crash(CONSOLE) == [
        "vng exit code 255",
        "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
        "RIP: 0010:inet_sk_state_store+0x15/0x70",
        "Kernel panic - not syncing: Fatal exception in interrupt",
    ]
    assert run_vm.emulator_fault(CONSOLE) == ("Oops: int3 RIP: 0010:inet_sk_state_store+0x15/0x70, "
                                              "no int3 in memory there")


def test_an_int3_still_in_memory_is_the_guests_own_and_not_an_emulator_fault():
    in_memory = CONSOLE._replace(printed=[line.replace("12 66 <90>", "12 cc <90>") for line in CONSOLE.printed])
    assert run_vm.emulator_fault(in_memory) is None
    no_code = CONSOLE._replace(printed=[line for line in CONSOLE.printed if "Code:" not in line])
    assert run_vm.emulator_fault(no_code) is None


def test_a_guest_that_died_otherwise_is_not_taken_for_an_emulator_fault():
    null_deref = CONSOLE._replace(printed=[
        line.replace("Oops: int3: 0000", "BUG: kernel NULL pointer dereference, address: 0")
        for line in CONSOLE.printed])
    assert run_vm.emulator_fault(null_deref) is None
    assert run_vm.guest_crash(null_deref)[1].startswith("BUG: kernel NULL pointer dereference")
    silent = run_vm.VmEnd("vng exit code 255", False, ["booting", "", "last words"])
    assert run_vm.emulator_fault(silent) is None
    assert run_vm.guest_crash(silent) == ["vng exit code 255", "booting", "last words"]


def fake_runs(monkeypatch, tmp_path, *guests, argvs=None, **options):
    """run_kernel with each boot replaced by the next of `guests`: a function that plays the
    guest in the results directory and returns how the VM ended. Each boot's vng command
    line is appended to `argvs`."""
    monkeypatch.setattr(run_vm, "RESULTS", tmp_path)
    monkeypatch.setattr(run_vm.vmlib, "RESULTS", tmp_path)  # the VM lock's directory
    monkeypatch.setattr(run_vm.kernels, "fetch", lambda name: tmp_path / "vmlinuz")
    monkeypatch.setattr(run_vm.kernels, "release_of", lambda name: "6.12.0-test")
    monkeypatch.setattr(run_vm.shutil, "which", lambda *a, **k: "/usr/bin/vng")
    boots = iter(guests)

    def boot(argv, env, timeout, out, name, quiet):
        if argvs is not None:
            argvs.append(argv)
        return next(boots)(out)
    monkeypatch.setattr(run_vm, "attempt", boot)
    return lambda: run_vm.run_kernel("6.12", "true", 60, "2G", quiet=True, **options)


def crashed(out):
    (out / "log").write_text("tests/kernel/test_a.py::test_ok PASSED\n")
    return CONSOLE


def passed(out):
    (out / "log").write_text("1 passed\n")
    (out / "rc").write_text("0\n")
    (out / "dmesg").write_text("")
    return run_vm.VmEnd("vng exit code 255", False, [])


def test_a_guest_killed_by_the_emulator_runs_once_more_and_the_summary_says_so(monkeypatch, tmp_path):
    ok, summary = fake_runs(monkeypatch, tmp_path, crashed, passed)()
    assert ok
    assert summary.startswith("kernel 6.12 (6.12.0-test): passed in ")
    assert "first run died of an emulator fault (Oops: int3 RIP: 0010:inet_sk_state_store" in summary
    kept = next(tmp_path.glob("6.12-*/log.1"))
    assert kept.read_text() == "tests/kernel/test_a.py::test_ok PASSED\n"


def test_a_guest_killed_twice_fails_with_its_crash_lines(monkeypatch, tmp_path):
    ok, summary = fake_runs(monkeypatch, tmp_path, crashed, crashed)()
    assert not ok
    assert "FAILED (no exit code from the guest; vng exit code 255; Oops: int3" in summary
    assert "Kernel panic - not syncing" in summary


def test_a_guest_that_died_of_its_own_oops_is_not_rerun(monkeypatch, tmp_path):
    def own_bug(out):
        crashed(out)
        return CONSOLE._replace(printed=[line.replace("Oops: int3: 0000", "BUG: unable to handle page fault")
                                         for line in CONSOLE.printed])
    ok, summary = fake_runs(monkeypatch, tmp_path, own_bug, passed)()
    assert not ok
    assert "BUG: unable to handle page fault" in summary and "ran once more" not in summary


def test_qemu_options_reach_vng_before_the_guest_command(monkeypatch, tmp_path):
    argvs = []
    fake_runs(monkeypatch, tmp_path, passed, argvs=argvs, qemu_opts="-icount shift=3,sleep=off -smp 1")()
    fake_runs(monkeypatch, tmp_path, passed, argvs=argvs)()
    with_opts, without = argvs
    assert with_opts[with_opts.index("--qemu-opts") + 1] == "-icount shift=3,sleep=off -smp 1"
    assert with_opts.index("--qemu-opts") < with_opts.index("--")
    assert "--qemu-opts" not in without


def test_a_guest_kernel_that_dies_after_the_command_finished_fails_the_run(monkeypatch, tmp_path):
    def passed_then_own_oops(out):
        passed(out)
        return CONSOLE._replace(printed=[line.replace("Oops: int3: 0000", "BUG: unable to handle page fault")
                                         for line in CONSOLE.printed])
    ok, summary = fake_runs(monkeypatch, tmp_path, passed_then_own_oops)()
    assert not ok
    assert "FAILED (guest kernel died: BUG: unable to handle page fault" in summary
    assert "after the test finished" in summary and "ran once more" not in summary


def test_an_emulator_fault_after_the_command_finished_leaves_its_result(monkeypatch, tmp_path):
    def passed_then_emulator(out):
        passed(out)
        return CONSOLE
    ok, summary = fake_runs(monkeypatch, tmp_path, passed_then_emulator, crashed)()  # no second boot
    assert ok
    assert summary.startswith("kernel 6.12 (6.12.0-test): passed in ")
    assert "[the guest died of an emulator fault after the test finished (Oops: int3" in summary


def test_a_vm_that_ends_with_no_console_at_all_boots_once_more(monkeypatch, tmp_path):
    def silent(out):
        return run_vm.VmEnd("vng exit code 1", False, [])
    ok, summary = fake_runs(monkeypatch, tmp_path, silent, passed)()
    assert ok
    assert "[the VM ended before its guest started (vng exit code 1), booted once more]" in summary
    ok, summary = fake_runs(monkeypatch, tmp_path, silent, silent)()
    assert not ok
    assert "FAILED (no exit code from the guest; vng exit code 1;" in summary
