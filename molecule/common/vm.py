#!/usr/bin/env python3
"""Boot and halt the Molecule test VMs: a Debian root with systemd, booted with virtme-ng
on a test-bed kernel, answering SSH on 127.0.0.1, plus an HTTP server on the host that
serves the project's apt repository (dist/apt) to the guest at http://10.0.2.2:<port>.

    molecule/common/vm.py up --kernel 6.1 --name ipvslb-6-1 --state <file>   # prints JSON
    molecule/common/vm.py down --state <file>

Called by create.yml and destroy.yml. What is reused rather than rewritten:
- testbed/kernels.py fetches the kernel (`kernels.py fetch 6.1`);
- packaging/vm-install-test builds the Debian root once with debootstrap
  (.cache/roots/<suite>-pkgtest: systemd, sshd, python3, busybox, the kernel's modules and
  headers, virtme-ng's key in root's authorized_keys) and knows virtme-ng's client key.
Each `up` copies that root to .cache/roots/molecule-<name> (kernel modules and headers,
never written, as hard links) so a run always starts from a clean system; `down` removes
the copy. `up` waits for the test bed's VM lock (.cache/results/.vm.lock) and gives it to
the VM, so no other test-bed VM runs from `create` until `destroy`. Processes run in their own sessions and are recorded in the state file, so
`down` stops exactly those.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_pkgtest():
    path = REPO / "packaging" / "vm-install-test"
    loader = importlib.machinery.SourceFileLoader("ipvslb_vm_install_test", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


pkgtest = _load_pkgtest()
kernels = pkgtest.kernels


def log(msg: str) -> None:
    print(f"molecule-vm: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_copy(base: Path, dest: Path) -> None:
    """cp -a of the base root, except the kernel's modules and headers (hard links)."""
    shutil.rmtree(dest, ignore_errors=True)
    shared = {Path("usr/lib/modules"), Path("usr/src")}

    def copy_level(rel: Path) -> None:
        (dest / rel).mkdir(parents=True, exist_ok=True)
        shutil.copystat(base / rel, dest / rel)
        for entry in sorted((base / rel).iterdir()):
            sub = rel / entry.name
            if sub in shared:
                subprocess.run(["cp", "-al", str(entry), str(dest / sub)], check=True)
            elif any(s.is_relative_to(sub) for s in shared) and entry.is_dir() and not entry.is_symlink():
                copy_level(sub)
            else:
                subprocess.run(["cp", "-a", str(entry), str(dest / sub)], check=True)

    copy_level(Path("."))


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
    vng = shutil.which("vng", path=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if vng is None:
        raise SystemExit("molecule-vm: vng not found; run `make venv` first")
    started = time.monotonic()
    suite = pkgtest.SUITE_OF[args.kernel]
    vmlinuz = kernels.fetch(args.kernel)
    release = kernels.release_of(args.kernel)
    identity = pkgtest.ensure_identity()
    base = pkgtest.base_root(suite, release, identity)
    root = kernels.CACHE / "roots" / f"molecule-{args.name}"
    t = time.monotonic()
    fresh_copy(base, root)
    (root / "etc/hostname").write_text(f"{args.name}\n")
    log(f"fresh root {root} in {time.monotonic() - t:.0f} s")

    logs = kernels.CACHE / "results" / f"molecule-{args.name}"  # kept after `down`
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    # The test bed's one-VM-at-a-time lock (.cache/results/.vm.lock, the file run_vm.py and
    # vm-install-test take), taken before the ports are picked and handed to vng: the VM
    # holds it from `create` until `destroy` stops it, however long Molecule takes between.
    lock = pkgtest.vm_lock()
    http_port, ssh_port = free_port(), free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                             "--directory", str(repo.resolve())], stdin=subprocess.DEVNULL,
                            stdout=(logs / "http.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)
    env = dict(os.environ, PATH=f"{Path(vng).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    vm = subprocess.Popen([vng, "--root", str(root), "--rw", "-r", str(vmlinuz), "--disable-kvm",
                           "-m", args.memory, "--cpus", str(args.cpus), "--systemd",
                           "--ssh", str(ssh_port), "--ssh-tcp", "--user", "root"],
                          stdin=subprocess.DEVNULL, stdout=(logs / "vng.log").open("w"),
                          stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True,
                          pass_fds=(lock.fileno(),))
    lock.close()  # the VM's copy of the descriptor keeps the lock
    state = {"instance": args.name, "address": "127.0.0.1", "user": "root", "port": ssh_port,
             "identity_file": str(identity), "http_port": http_port, "repo_url": f"http://10.0.2.2:{http_port}",
             "vm_pid": vm.pid, "http_pid": http.pid, "root": str(root), "kernel": args.kernel,
             "release": release, "suite": suite, "logs": str(logs)}
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    t = time.monotonic()
    ssh = ssh_argv(identity, ssh_port)
    while True:
        if vm.poll() is not None:
            raise SystemExit(f"molecule-vm: the VM exited ({vm.returncode}) before SSH; see {logs}/vng.log")
        if time.monotonic() - t > args.boot_timeout:
            raise SystemExit(f"molecule-vm: no SSH after {args.boot_timeout:.0f} s; see {logs}/vng.log")
        try:
            rc = subprocess.run([*ssh, "systemctl", "is-system-running", "--wait"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=300).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        if rc in (0, 1):  # running or degraded: systemd has finished booting
            break
        time.sleep(3)
    log(f"{args.name}: kernel {release} (Debian {suite}) up, SSH on 127.0.0.1:{ssh_port} after "
        f"{time.monotonic() - t:.0f} s boot, {time.monotonic() - started:.0f} s in all")
    print(json.dumps(state))
    return 0


def down(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if not state_file.exists():
        log(f"no state file {state_file}: nothing to stop")
        return 0
    state = json.loads(state_file.read_text())
    vm_pid, http_pid = state["vm_pid"], state["http_pid"]
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
    for pid in (vm_pid, http_pid):
        try:
            os.killpg(pid, signal.SIGTERM)  # the session (and so the process group) we started
        except (ProcessLookupError, PermissionError):
            pass
    shutil.rmtree(state["root"], ignore_errors=True)
    state_file.unlink()
    log(f"{state['instance']} stopped; logs in {state['logs']}")
    return 0


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
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
