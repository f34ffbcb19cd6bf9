"""The test bed's VM library (testbed/vmlib.py): how a guest kernel's death is read from its
console, judged, and how fast a launcher's wait ends when it happens. Recorded consoles
stand in for the guest; small shell scripts stand in for vng and ssh, so the real process
handling (pipes, process groups, kills) is what runs."""
import argparse
import importlib.machinery
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).parents[2]
sys.path.insert(0, str(REPO / "testbed"))
import vmlib  # noqa: E402


def _load(name, path):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


pkgtest = _load("vm_install_test_under_test", REPO / "packaging" / "vm-install-test")
molecule_vm = _load("molecule_vm_under_test", REPO / "molecule" / "common" / "vm.py")

BOOT = [
    "[    0.000000] Linux version 6.12.117+deb13-amd64 (debian-kernel@lists.debian.org)",
    "[    7.399382] IPVS: ipvs loaded.",
]
# The emulator pattern as the package install test met it on 6.12 (Debian 13, guest time
# 316 s): an int3 trap in hash_conntrack_raw whose Code: bytes hold a nop (66 <90>) there.
# Rebuilt from that run's account (the trap bytes, the functions, the panic); the other
# bytes and the timestamps are filled in. tests/unit/test_run_vm.py has a recorded one.
EMULATOR = BOOT + [
    "[  316.201734] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
    "[  316.201990] CPU: 1 UID: 0 PID: 0 Comm: swapper/1 Not tainted 6.12.117+deb13-amd64 #1",
    "[  316.202131] RIP: 0010:hash_conntrack_raw+0x1c/0xd0 [nf_conntrack]",
    "[  316.202333] Code: 90 90 90 90 90 90 90 90 90 90 0f 1f 44 00 00 55 48 89 e5 41 54 53 48 8b 05 "
    "1b 2a 01 00 66 <90> 48 89 fb 8b 56 30 89 d1 c1 e9 10 31 d1 8b 56 38 31 ca 8b 4e",
    "[  316.202901] Call Trace:",
    "[  316.203012]  <IRQ>",
    "[  316.203180]  ip_vs_conn_drop_conntrack+0x9a/0x170 [ip_vs]",
    "[  316.203277]  ip_vs_conn_expire+0x1b6/0x2a0 [ip_vs]",
    "[  316.203901] ---[ end trace 0000000000000000 ]---",
    "[  316.204100] RIP: 0010:hash_conntrack_raw+0x1c/0xd0 [nf_conntrack]",
    "[  316.204711] Kernel panic - not syncing: Fatal exception in interrupt",
    "[  316.209948] Kernel Offset: 0x19400000 from 0xffffffff81000000",
]
# A death of the guest's own: a NULL pointer dereference in process context (no panic: the
# kernel kills the task and goes on, and the test waiting for it would hang).
OWN_OOPS = BOOT + [
    "[   42.118201] BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "[   42.118377] #PF: supervisor read access in kernel mode",
    "[   42.118600] Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "[   42.118777] RIP: 0010:ip_vs_conn_expire+0x41/0x2a0 [ip_vs]",
    "[   42.118890] Code: 48 8b 47 08 48 85 c0 74 3e <48> 8b 50 08 48 89 d7 e8 55 aa 00 00 5b 5d",
    "[   42.119655] ---[ end trace 0000000000000000 ]---",
]


def test_the_emulator_pattern_is_read_from_a_recorded_console():
    died = vmlib.death(EMULATOR)
    assert died.crash == ["Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
                          "RIP: 0010:hash_conntrack_raw+0x1c/0xd0 [nf_conntrack]",
                          "Kernel panic - not syncing: Fatal exception in interrupt"]
    assert died.fault == "Oops: int3 RIP: 0010:hash_conntrack_raw+0x1c/0xd0 [nf_conntrack], no int3 in memory there"


def test_an_int3_still_in_memory_is_the_guests_own():
    in_memory = [line.replace("00 66 <90>", "00 cc <90>") for line in EMULATOR]
    assert vmlib.death(in_memory).fault is None


def test_a_real_oops_is_a_death_of_the_guests_own():
    died = vmlib.death(OWN_OOPS)
    assert died.fault is None
    assert died.crash[0] == "BUG: kernel NULL pointer dereference, address: 0000000000000008"
    assert "RIP: 0010:ip_vs_conn_expire+0x41/0x2a0 [ip_vs]" in died.crash


def test_no_console_or_a_quiet_one_is_no_death():
    assert vmlib.death([]) is None
    assert vmlib.death(BOOT) is None
    # A WARNING is not a death (run_vm fails it through the guest's dmesg), nor is "BUG:"
    # printed by a program rather than the kernel (no "[ time]" prefix).
    warning = BOOT + ["[   50.1] WARNING: CPU: 0 PID: 1 at net/core/dev.c:1 x+0x1/0x2",
                      "[   50.2] ---[ end trace 0000000000000000 ]---", "BUG: the test's own word"]
    assert vmlib.death(warning) is None


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fed(lines, clock, **kw):
    console = vmlib.Console(clock=clock, **kw)
    for line in lines:
        console.feed(line + "\n")
    return console


def test_a_panic_settles_the_death_at_once():
    assert fed(EMULATOR, Clock()).dead()


def test_an_oops_without_a_panic_settles_a_second_after_its_report_ends():
    clock = Clock()
    console = fed(OWN_OOPS, clock, settle=1.0)
    assert not console.dead()  # a panic may follow: wait for it
    clock.now += 1.0
    assert console.dead()


def test_a_report_cut_short_settles_after_the_grace():
    clock = Clock()
    console = fed(OWN_OOPS[:-2], clock, grace=10.0)  # no Code:, no end of trace
    clock.now += 9.9
    assert not console.dead()
    clock.now += 0.1
    assert console.dead()


def test_a_quiet_console_never_settles():
    clock = Clock()
    console = fed(BOOT, clock)
    clock.now += 3600
    assert not console.dead()
    assert console.death() is None


def test_the_rerun_policy():
    emulator, own = vmlib.death(EMULATOR), vmlib.death(OWN_OOPS)
    # started, finished, timed out, death
    assert vmlib.once_more(False, False, False, None) == "the VM ended before its guest started"
    assert vmlib.once_more(False, False, True, None) is None  # a boot that hangs is not retried
    assert vmlib.once_more(True, False, False, emulator).startswith("the guest died of an emulator fault (Oops: int3")
    assert vmlib.once_more(False, False, False, emulator) is not None  # died of it while booting
    assert vmlib.once_more(True, False, False, own) is None
    assert vmlib.once_more(False, False, False, own) is None
    assert vmlib.once_more(True, True, False, emulator) is None  # the test had finished
    assert vmlib.once_more(True, False, False, None) is None


def test_the_verdict_on_a_death():
    emulator, own = vmlib.death(EMULATOR), vmlib.death(OWN_OOPS)
    assert vmlib.judge(True, None) == (None, None)
    # A panic after the test finished: the result stands if the emulator did it...
    failed, note = vmlib.judge(True, emulator)
    assert failed is None and note.startswith("the guest died of an emulator fault after the test finished")
    # ...and fails the run if the kernel did it itself.
    failed, note = vmlib.judge(True, own)
    assert failed.startswith("guest kernel died: BUG: kernel NULL pointer dereference") and note is None
    assert failed.endswith("after the test finished")
    failed, _ = vmlib.judge(False, emulator)  # a second emulator death before the end
    assert failed.startswith("guest kernel died: Oops: int3")


# --- Real processes: a script plays vng (its console on stdout) and ssh ------------------

def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def fake_vng(tmp_path: Path, console: list[str], then: str = "exec sleep 600") -> Path:
    """A VM whose console prints `console` after half a second, then does `then` (by
    default hangs, as QEMU does after a panic without panic=-1)."""
    lines = tmp_path / "console.txt"
    lines.write_text("".join(line + "\n" for line in console))
    # The sleep runs in the background so that the group kill has a grandchild to kill too.
    return script(tmp_path / "vng", f"sleep 0.5\ncat {lines}\nsleep 600 &\necho $! > {tmp_path}/child\n{then}\n")


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_guest_death_ends_the_wait_in_seconds_and_kills_the_whole_group(tmp_path):
    vm = vmlib.Vm([str(fake_vng(tmp_path, OWN_OOPS))], {"PATH": "/usr/bin:/bin"}, tmp_path / "vng.log")
    started = time.monotonic()
    assert vm.watch(600) == "died"
    assert time.monotonic() - started < 5
    assert vm.proc.returncode == -9
    assert vm.console.death().crash[0].startswith("BUG: kernel NULL pointer dereference")
    assert "Oops: 0000 [#1]" in (tmp_path / "vng.log").read_text()
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 2
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child)  # the VM's own children went with its group


def test_a_silent_vm_runs_until_the_timeout(tmp_path):
    vm = vmlib.Vm([str(fake_vng(tmp_path, []))], {"PATH": "/usr/bin:/bin"}, tmp_path / "vng.log")
    try:
        assert vm.watch(1.5, poll=0.1) == "timeout"
        assert vm.proc.poll() is None and vm.console.death() is None
    finally:
        vm.kill()


def test_run_vm_reports_the_kill_after_a_death(tmp_path):
    run_vm = _load("run_vm_under_test", REPO / "testbed" / "run_vm.py")
    started = time.monotonic()
    said = run_vm.boot([str(fake_vng(tmp_path, OWN_OOPS))], {"PATH": "/usr/bin:/bin"}, 600, tmp_path / "vng.log")
    assert time.monotonic() - started < 5
    assert said.how == "stopped: the guest kernel died" and not said.timed_out
    assert run_vm.guest_crash(said)[1].startswith("BUG: kernel NULL pointer dereference")
    assert (tmp_path / "vng.log").read_text().endswith("--- stopped: the guest kernel died\n")


def fake_ssh(tmp_path: Path) -> Path:
    """ssh to a guest whose systemd is up and whose install test hangs after its first
    step (the guest's kernel has died under it)."""
    return script(tmp_path / "ssh", """
while [ "$1" = -p ]; do shift 2; done
case "$1" in
  systemctl) exit 0 ;;
  sh) cat >/dev/null; echo "STEP install"; exec sleep 600 ;;
  *) exit 0 ;;
esac
""")


def pkgtest_once(tmp_path, console):
    vng = fake_vng(tmp_path, console, then="exec sleep 600")
    # The console comes only once the guest test is under way.
    vng.write_text(vng.read_text().replace("sleep 0.5", "sleep 1"))
    args = argparse.Namespace(boot_timeout=30, timeout=1500, shell=False)
    started = time.monotonic()
    run = pkgtest.run_once([str(vng)], {"PATH": "/usr/bin:/bin"}, [str(fake_ssh(tmp_path)), "-p", "2222"],
                           args, tmp_path, "http://10.0.2.2:8000", 8000)
    return run, time.monotonic() - started


def test_the_package_test_stops_waiting_when_the_emulator_kills_the_guest(tmp_path):
    run, took = pkgtest_once(tmp_path, EMULATOR)
    assert took < 10  # not the 1500 s of --timeout
    assert run.booted and run.rc is None
    assert run.death.fault.startswith("Oops: int3 RIP: 0010:hash_conntrack_raw")
    assert vmlib.once_more(run.booted, run.rc is not None, False, run.death)  # so: once more
    assert (tmp_path / "guest.log").read_text() == "STEP install\n"


def test_the_package_test_fails_at_once_on_the_guests_own_death(tmp_path):
    run, took = pkgtest_once(tmp_path, OWN_OOPS)
    assert took < 10
    assert run.death.fault is None and run.rc is None
    assert vmlib.once_more(run.booted, False, False, run.death) is None
    assert vmlib.judge(False, run.death)[0].startswith("guest kernel died: BUG: kernel NULL pointer")


def test_molecules_watcher_stops_the_vm_and_records_the_death(tmp_path):
    vng = fake_vng(tmp_path, EMULATOR)
    logs = tmp_path / "logs"
    logs.mkdir()
    vm = vmlib.subprocess.Popen([str(vng)], stdout=(logs / "vng.log").open("w"), start_new_session=True)
    started = time.monotonic()
    molecule_vm.watch(argparse.Namespace(vm_pid=vm.pid, logs=str(logs)))
    assert vm.wait(5) == -9
    assert time.monotonic() - started < 5
    died = molecule_vm.read_death(logs)
    assert died == vmlib.death(EMULATOR) and died.fault


def test_molecules_watcher_leaves_a_vm_that_powers_off_alone(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    vm = vmlib.subprocess.Popen([str(fake_vng(tmp_path, BOOT, then="exit 0"))],
                                stdout=(logs / "vng.log").open("w"), start_new_session=True)
    monkeypatch.setattr(molecule_vm, "alive", lambda pid: vm.poll() is None)  # reaps it, as init would
    molecule_vm.watch(argparse.Namespace(vm_pid=vm.pid, logs=str(logs)))
    assert vm.returncode == 0
    assert molecule_vm.read_death(logs) is None


def test_the_census_counts_boots_deaths_and_emulator_faults_per_launcher(tmp_path):
    def write(path, *consoles):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join("\n".join(c) + "\n--- vng exit code 255\n" for c in consoles))
    write(tmp_path / "6.12-1" / "vng.log", EMULATOR, BOOT)  # run_vm: two boots in one log
    write(tmp_path / "6.1-2" / "vng.log", BOOT)
    (tmp_path / "6.1-3").mkdir()  # waited for the lock, never booted
    (tmp_path / "6.1-3" / "guest.sh").write_text("")
    (tmp_path / "6.1").symlink_to("6.1-2")
    (tmp_path / "pkgtest-4").mkdir()
    (tmp_path / "pkgtest-4" / "vng.log.1").write_text("\n".join(OWN_OOPS))
    (tmp_path / "pkgtest-4" / "vng.log").write_text("\n".join(BOOT))
    assert vmlib.census(tmp_path) == {
        "kernel tests": {"runs": 2, "boots": 3, "deaths": 1, "emulator faults": 1},
        "package test": {"runs": 1, "boots": 2, "deaths": 1, "emulator faults": 0},
    }


def fake_molecule(tmp_path, monkeypatch, *deaths):
    """`molecule` on PATH: each run records the next of `deaths` (a console, or None) the
    way the watcher does, and fails if it recorded one."""
    monkeypatch.setattr(vmlib, "RESULTS", tmp_path / "results")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runs = []
    for n, console in enumerate(deaths):
        logs = tmp_path / "results" / "molecule-ipvslb-6-1"
        record = ""
        if console is not None:
            died = vmlib.death(console)
            (tmp_path / f"died{n}.json").write_text(json.dumps({"crash": died.crash, "fault": died.fault}))
            record = f"cp {tmp_path}/died{n}.json {logs}/guest-died.json; exit 1"
        runs.append(f"{n}) mkdir -p {logs}; {record} ;;")
    script(bin_dir / "molecule", f"""n=$(cat {tmp_path}/count 2>/dev/null || echo 0)
echo $((n + 1)) > {tmp_path}/count
case $n in
{chr(10).join(runs)}
esac
exit 0
""")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return lambda: molecule_vm.test(argparse.Namespace(scenario="kernel-6.1"))


def test_molecule_runs_a_scenario_once_more_after_an_emulator_fault(tmp_path, monkeypatch, capsys):
    assert fake_molecule(tmp_path, monkeypatch, EMULATOR, None)() == 0
    said = capsys.readouterr().err
    assert "molecule kernel-6.1: passed [first run died of an emulator fault (Oops: int3" in said
    assert f"its log: {tmp_path}/results/molecule-ipvslb-6-1.1)" in said
    assert (tmp_path / "count").read_text() == "2\n"


def test_molecule_fails_at_once_on_the_guests_own_death(tmp_path, monkeypatch, capsys):
    assert fake_molecule(tmp_path, monkeypatch, OWN_OOPS, None)() == 1
    assert "FAILED (guest kernel died: BUG: kernel NULL pointer dereference" in capsys.readouterr().err
    assert (tmp_path / "count").read_text() == "1\n"
