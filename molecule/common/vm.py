#!/usr/bin/env python3
"""Boot and halt the Molecule test VMs: a Debian root with systemd, booted with virtme-ng
on a test-bed kernel, answering SSH on 127.0.0.1, plus an HTTP server on the host that
serves the project's apt repository (dist/apt) to the guest at http://10.0.2.2:<port>.

    molecule/common/vm.py up --kernel 6.1 --name ipvslb-6-1 --state <file>   # prints JSON
    molecule/common/vm.py down --state <file>
    molecule/common/vm.py test kernel-6.1       # `molecule test -s kernel-6.1`, see below

Called by create.yml and destroy.yml. What is reused rather than rewritten:
- testbed/vmlib.py: the test bed's VM lock, free ports, the root copy, the console watch;
- testbed/kernels.py fetches the kernel;
- packaging/vm-install-test builds the Debian root once with debootstrap
  (.cache/roots/<suite>-pkgtest: systemd, sshd, python3, busybox, the kernel's modules and
  headers, virtme-ng's key in root's authorized_keys) and knows virtme-ng's client key.
Each `up` copies that root to .cache/roots/molecule-<name> so a run always starts from a
clean system; `down` removes the copy. `up` waits for the test bed's VM lock
(.cache/results/.vm.lock) and gives it to the VM, so no other test-bed VM runs from
`create` until `destroy`. Processes run in their own sessions and are recorded in the state
file, so `down` stops exactly those.

The guest kernel's console (vng.log) is watched from boot to `down` by a watcher process
that `up` leaves behind: when the guest kernel dies (panic, Oops, BUG) it stops the VM at
once, so the step under way (converge, verify) fails within seconds instead of at
Ansible's timeouts, and records the death in guest-died.json beside the logs; `down` prints
it. `test` runs `molecule test -s <scenario>` and, when it failed because a guest died of an
emulator fault (vmlib.emulator_fault), runs the scenario once more from a clean state and
says so, naming the first run's logs.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "testbed"))
import vmlib  # noqa: E402


def _load_pkgtest():
    path = REPO / "packaging" / "vm-install-test"
    loader = importlib.machinery.SourceFileLoader("ipvslb_vm_install_test", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


pkgtest = _load_pkgtest()
kernels = pkgtest.kernels
DIED = "guest-died.json"


def log(msg: str) -> None:
    print(f"molecule-vm: {msg}", file=sys.stderr, flush=True)


def ssh_argv(identity: Path, port: int) -> list[str]:
    return pkgtest.ssh_argv(identity, port)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def up(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if alive(state["vm_pid"]) and subprocess.run(
                [*ssh_argv(Path(state["identity_file"]), state["port"]), "true"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60).returncode == 0:
            log(f"{args.name} already running (ssh port {state['port']})")
            print(json.dumps(state))
            return 0
        down(args)
    repo = Path(args.repo)
    if not (repo / "dists").is_dir():
        raise SystemExit(f"molecule-vm: no apt repository at {repo}; run `make apt-repo` first")
    vng, env = vmlib.vng("molecule-vm")
    started = time.monotonic()
    suite = pkgtest.SUITE_OF[args.kernel]
    vmlinuz = kernels.fetch(args.kernel)
    release = kernels.release_of(args.kernel)
    identity = pkgtest.ensure_identity()
    base = pkgtest.base_root(suite, release, identity)
    root = kernels.CACHE / "roots" / f"molecule-{args.name}"
    t = time.monotonic()
    vmlib.copy_root(base, root)
    (root / "etc/hostname").write_text(f"{args.name}\n")
    log(f"fresh root {root} in {time.monotonic() - t:.0f} s")

    logs = vmlib.RESULTS / f"molecule-{args.name}"  # kept after `down`
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    # The test bed's one-VM-at-a-time lock (.cache/results/.vm.lock, the file run_vm.py and
    # vm-install-test take), taken before the ports are picked and handed to vng: the VM
    # holds it from `create` until `destroy` stops it, however long Molecule takes between.
    lock = vmlib.vm_lock("molecule-vm")
    http_port, ssh_port = vmlib.free_port(), vmlib.free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                             "--directory", str(repo.resolve())], stdin=subprocess.DEVNULL,
                            stdout=(logs / "http.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)
    # The console goes to a file, not through `up`: the VM outlives this process.
    console_log = logs / "vng.log"
    vm = subprocess.Popen([vng, "--root", str(root), "--rw", "-r", str(vmlinuz), "--disable-kvm",
                           "-m", args.memory, "--cpus", str(args.cpus), "--systemd",
                           "--ssh", str(ssh_port), "--ssh-tcp", "--user", "root"],
                          stdin=subprocess.DEVNULL, stdout=console_log.open("w"),
                          stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True,
                          pass_fds=(lock.fileno(),))
    lock.close()  # the VM's copy of the descriptor keeps the lock
    watcher = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "watch", "--vm-pid", str(vm.pid),
                                "--logs", str(logs)], stdin=subprocess.DEVNULL,
                               stdout=(logs / "watch.log").open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True, close_fds=True)
    state = {"instance": args.name, "address": "127.0.0.1", "user": "root", "port": ssh_port,
             "identity_file": str(identity), "http_port": http_port, "repo_url": f"http://10.0.2.2:{http_port}",
             "vm_pid": vm.pid, "http_pid": http.pid, "watch_pid": watcher.pid, "root": str(root),
             "kernel": args.kernel, "release": release, "suite": suite, "logs": str(logs)}
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    t = time.monotonic()
    ended = wait_ssh(vm, ssh_argv(identity, ssh_port), args.boot_timeout)
    if ended != "up":
        died = read_death(logs)
        raise SystemExit(f"molecule-vm: {ended}; see {console_log}" + (f" ({died.why()})" if died else ""))
    log(f"{args.name}: kernel {release} (Debian {suite}) up, SSH on 127.0.0.1:{ssh_port} after "
        f"{time.monotonic() - t:.0f} s boot, {time.monotonic() - started:.0f} s in all")
    print(json.dumps(state))
    return 0


def wait_ssh(vm: subprocess.Popen, ssh: list[str], boot_timeout: float) -> str:
    """Until systemd is up behind SSH ("up"), or why not; the watcher stops a VM whose guest
    kernel died, which ends this wait too."""
    deadline = time.monotonic() + boot_timeout
    while True:
        probe = subprocess.Popen([*ssh, "systemctl", "is-system-running", "--wait"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        while probe.poll() is None and vm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if probe.poll() is None:
            probe.kill()
            probe.wait()
        elif probe.returncode in (0, 1):  # running or degraded: systemd has finished booting
            return "up"
        if vm.poll() is not None:
            time.sleep(1)  # the watcher's record, if the guest kernel died
            return f"the VM exited ({vm.returncode}) before SSH"
        if time.monotonic() >= deadline:
            return f"no SSH after {boot_timeout:.0f} s"
        time.sleep(3)


def watch(args: argparse.Namespace) -> int:
    """The watcher `up` leaves behind: follows the VM's console until the VM is gone; if the
    guest kernel dies first, stops the VM and records the death for `down` and `test`."""
    logs = Path(args.logs)
    console = vmlib.Console()
    vmlib.follow(logs / "vng.log", console, stop=lambda: not alive(args.vm_pid))
    died = console.death()
    if died is None or not console.dead():
        return 0
    vmlib.kill_group(args.vm_pid)
    (logs / DIED).write_text(json.dumps({"crash": died.crash, "fault": died.fault}, indent=2) + "\n")
    log(f"{died.why()}; VM stopped")
    return 0


def read_death(logs: Path) -> vmlib.Death | None:
    record = logs / DIED
    if not record.exists():
        return None
    died = json.loads(record.read_text())
    return vmlib.Death(died["crash"], died["fault"])


def down(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if not state_file.exists():
        log(f"no state file {state_file}: nothing to stop")
        return 0
    state = json.loads(state_file.read_text())
    vm_pid, http_pid = state["vm_pid"], state["http_pid"]
    died = read_death(Path(state["logs"]))
    if died is not None:
        log(f"{state['instance']}: {died.why()} (console: {state['logs']}/vng.log)")
    if alive(vm_pid):
        ssh = ssh_argv(Path(state["identity_file"]), state["port"])
        try:
            subprocess.run([*ssh, "journalctl", "--no-pager", "-b"], timeout=120, stderr=subprocess.DEVNULL,
                           stdout=(Path(state["logs"]) / "journal.txt").open("w"))
            subprocess.run([*ssh, "systemctl", "poweroff"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            pass
        deadline = time.monotonic() + 90
        while alive(vm_pid) and time.monotonic() < deadline:
            try:  # our own child only when `up` and `down` run in one process; reap if so
                os.waitpid(vm_pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(1)
    for pid in (vm_pid, http_pid, state.get("watch_pid")):
        if pid:  # the session (and so the process group) `up` started
            vmlib.kill_group(pid, signal.SIGTERM)
    shutil.rmtree(state["root"], ignore_errors=True)
    state_file.unlink()
    log(f"{state['instance']} stopped; logs in {state['logs']}")
    return 0


def test(args: argparse.Namespace) -> int:
    """`molecule test -s <scenario>`, run once more from a clean state (destroy leaves none
    behind) when a guest died of an emulator fault before it passed (vmlib.once_more)."""
    import yaml  # Molecule's own dependency: this runs with its tools

    scenario = yaml.safe_load((REPO / "molecule" / args.scenario / "molecule.yml").read_text())
    logs = [vmlib.RESULTS / f"molecule-{platform['name']}" for platform in scenario["platforms"]]
    notes: list[str] = []
    for attempt in (1, 2):
        for d in logs:
            (d / DIED).unlink(missing_ok=True)
        rc = subprocess.run(["molecule", "test", "-s", args.scenario], cwd=REPO).returncode
        deaths = [(d, died) for d in logs if (died := read_death(d)) is not None]
        again = [vmlib.once_more(True, rc == 0, False, died) for _, died in deaths]
        if attempt == 2 or not deaths or not all(again):
            break
        for d, died in deaths:
            kept = d.with_name(d.name + ".1")
            shutil.rmtree(kept, ignore_errors=True)
            d.rename(kept)
            notes.append(died.rerun_note(kept))
        log(f"molecule {args.scenario}: {'; '.join(filter(None, again))}; running it once more")
    failures = []
    for _, died in deaths:
        failed, note = vmlib.judge(rc == 0, died)
        failures += [failed] if failed else []
        notes += [note] if note else []
    verdict = "passed" if rc == 0 and not failures else "FAILED" + (f" ({'; '.join(failures)})" if failures else "")
    log(f"molecule {args.scenario}: {verdict}" + "".join(f" [{n}]" for n in notes))
    return 0 if verdict == "passed" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--kernel", required=True, choices=sorted(pkgtest.SUITE_OF))
    p_up.add_argument("--name", required=True)
    p_up.add_argument("--state", required=True, help="JSON file recording the VM (ports, pids, root)")
    p_up.add_argument("--repo", default=str(REPO / "dist" / "apt"), help="apt repository to serve")
    p_up.add_argument("--memory", default="2G")
    p_up.add_argument("--cpus", type=int, default=2)
    p_up.add_argument("--boot-timeout", type=float, default=900)
    p_up.set_defaults(func=up)
    p_down = sub.add_parser("down")
    p_down.add_argument("--state", required=True)
    p_down.set_defaults(func=down)
    p_watch = sub.add_parser("watch", help="(started by `up`) stop the VM if its guest kernel dies")
    p_watch.add_argument("--vm-pid", type=int, required=True)
    p_watch.add_argument("--logs", required=True)
    p_watch.set_defaults(func=watch)
    p_test = sub.add_parser("test", help="molecule test -s SCENARIO, once more after an emulator fault")
    p_test.add_argument("scenario")
    p_test.set_defaults(func=test)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
