#!/usr/bin/env python3
"""Run a command (by default the kernel test suite) inside one VM per Debian kernel.

    testbed/run_vm.py --kernels "6.1 6.12 newest"               # pytest tests/kernel
    testbed/run_vm.py --kernels 6.12 -- -k smoke -x              # extra pytest arguments
    testbed/run_vm.py --kernels 6.1 --exec "python3 -m ipvslb demo-guest"

Each VM is virtme-ng under QEMU TCG (KVM aborts on these machines) with the host's root
filesystem copy-on-write and 2 GiB. The guest writes its log, exit code and dmesg into a
results directory shared with --rwdir; the host follows the log live, then prints one
summary line per kernel, with each failed test's assertion lines under it. The run fails
if any kernel's command fails, times out, or its dmesg shows BUG:/WARNING:/Oops. A VM that
ends before its guest starts the command (QEMU has crashed while booting) boots once more,
and so does one whose guest kernel died of an int3 that QEMU's emulation of self-patching
kernel code left behind (see emulator_fault); the summary line says so. The guest kernel's
console is kept in vng.log and its crash lines are named in the summary.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels  # noqa: E402

REPO = kernels.REPO
RESULTS = kernels.CACHE / "results"
DMESG_BAD = re.compile(r"BUG:|WARNING:|Oops")


def guest_script(command: str, out: Path) -> str:
    venv_bin = REPO / ".venv" / "bin"
    return f"""#!/bin/sh
cd {shlex.quote(str(REPO))}
export PATH={shlex.quote(str(venv_bin))}:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export IPVSLB_IN_VM=1 IPVSLB_RESULTS={shlex.quote(str(out))} HOME=/root
( {command} ) > {out}/log 2>&1
echo $? > {out}/rc
dmesg > {out}/dmesg
"""


def follow(path: Path, prefix: str, stop: threading.Event) -> None:
    """Print a file as it grows, so a long VM run shows progress."""
    offset, partial = 0, b""
    while True:
        finished = stop.is_set()
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            if finished and partial:
                lines.append(partial)
            for line in lines:
                sys.stdout.write(f"{prefix}{line.decode(errors='replace')}\n")
            sys.stdout.flush()
        if finished:
            return
        stop.wait(0.5)


def vm_lock(shared: bool = False):
    """One TCG VM at a time on this machine: two at once on two cores made both slow and
    turned timing tests flaky. Concurrent runs queue here instead (unless `shared`)."""
    handle = open(RESULTS / ".vm.lock", "w")
    if shared:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("run_vm: another VM is running on this machine; waiting for it", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def run_kernel(name: str, command: str, timeout: float, memory: str, quiet: bool,
               shared: bool = False, qemu_opts: str = "") -> tuple[bool, str]:
    vmlinuz = kernels.fetch(name)
    release = kernels.release_of(name)
    # One directory per run, so that concurrent runs never share a guest log.
    out = RESULTS / f"{name}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    latest = RESULTS / name
    if latest.is_symlink() or latest.exists():
        shutil.rmtree(latest) if latest.is_dir() and not latest.is_symlink() else latest.unlink()
    latest.symlink_to(out.name)
    script = out / "guest.sh"
    script.write_text(guest_script(command, out))
    script.chmod(0o755)
    vng = shutil.which("vng", path=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if vng is None:
        raise SystemExit("run_vm: vng not found; run `make venv` first")
    # --verbose: the guest kernel's console goes to vng.log, so a guest that panics says why.
    argv = [vng, "-r", str(vmlinuz), "--disable-kvm", "--verbose", "-m", memory, "--rwdir", str(out),
            *(["--qemu-opts", qemu_opts] if qemu_opts else []), "--", str(script)]
    env = dict(os.environ, PATH=f"{Path(vng).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    lock = vm_lock(shared)
    started = time.monotonic()
    reruns = []
    try:
        vm_said = attempt(argv, env, timeout, out, name, quiet)
        # QEMU's TCG has crashed (a segfault, in the host's dmesg) while booting on these
        # machines. The guest never started the command, so nothing was tested: boot once
        # more. A guest that started (it writes its log first) is rerun only when the
        # emulator itself broke it (see emulator_fault).
        if not (out / "log").exists() and not vm_said.timed_out:
            print(f"run_vm: the {name} VM ended before its guest started ({'; '.join(guest_crash(vm_said))}); "
                  "booting it once more", flush=True)
            vm_said = attempt(argv, env, timeout, out, name, quiet)
        elif not (out / "rc").exists() and (fault := emulator_fault(vm_said)):
            kept = out / "log.1"
            (out / "log").replace(kept)
            reruns.append(f"first run died of an emulator fault ({fault}; its log: {kept}), ran once more")
            print(f"run_vm: the {name} guest died of an emulator fault ({fault}); running it once more",
                  flush=True)
            vm_said = attempt(argv, env, timeout, out, name, quiet)
    finally:
        lock.close()
    wall = time.monotonic() - started
    rc_file = out / "rc"
    rc = int(rc_file.read_text()) if rc_file.exists() and rc_file.read_text().strip() else None
    dmesg = (out / "dmesg").read_text(errors="replace") if (out / "dmesg").exists() else ""
    bad = [line for line in dmesg.splitlines() if DMESG_BAD.search(line)]
    ok = rc == 0 and not bad
    why = []
    if rc is None:
        why += ["no exit code from the guest", *guest_crash(vm_said), f"vng's output and the guest's console in "
                f"{out / 'vng.log'}"]
    elif rc:
        why.append(f"exit code {rc}")
    if bad:
        why.append(f"dmesg: {bad[0].strip()}")
    verdict = "passed" if ok else "FAILED (" + "; ".join(why) + ")"
    summary = f"kernel {name} ({release}): {verdict} in {wall:.1f} s" + "".join(f" [{r}]" for r in reruns)
    # CI shows only the tail of a long log: repeat pytest's failure lines under the verdict.
    log = (out / "log").read_text(errors="replace") if (out / "log").exists() else ""
    return ok, "\n".join([summary, *(f"    {line[:300]}" for line in failure_lines(log))])


class VmEnd(NamedTuple):
    how: str              # "vng exit code N" or "timed out after N s"
    timed_out: bool
    printed: list[str]    # every line vng, QEMU and the guest's console printed


def attempt(argv: list[str], env: dict[str, str], timeout: float, out: Path, name: str,
            quiet: bool) -> VmEnd:
    """One boot, with the guest's log followed live unless `quiet`."""
    stop = threading.Event()
    follower = threading.Thread(target=follow, args=(out / "log", f"[{name}] ", stop), daemon=True)
    if not quiet:
        follower.start()
    try:
        return boot(argv, env, timeout, out / "vng.log")
    finally:
        stop.set()
        if follower.is_alive():
            follower.join()


def boot(argv: list[str], env: dict[str, str], timeout: float, vng_log: Path) -> VmEnd:
    """Run one VM; return how vng ended and every line it and the guest's console printed,
    for when the guest reports nothing. (vng exits 255 even when the guest's command
    succeeded: the guest's own exit code is in `rc`.) The same is appended to `vng_log`."""
    # Its own process group: vng starts virtme-run, which starts QEMU, and a timeout must
    # stop all three (killing vng alone once left a QEMU running for half an hour).
    vm = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        stdout, stderr = vm.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(vm.pid, signal.SIGKILL)
        stdout, stderr = vm.communicate()
        said = stdout + stderr
        with vng_log.open("a") as f:
            f.write(f"--- timed out after {timeout:.0f} s\n{said}")
        return VmEnd(f"timed out after {timeout:.0f} s", True, said.splitlines())
    finally:
        if vm.poll() is None:  # interrupted (Ctrl-C): the VM goes with us
            os.killpg(vm.pid, signal.SIGKILL)
            vm.wait()
    with vng_log.open("a") as f:
        f.write(f"--- vng exit code {vm.returncode}\n{stdout}{stderr}")
    return VmEnd(f"vng exit code {vm.returncode}", False, (stdout + stderr).splitlines())


# The guest kernel's own account of its death, from its console.
CRASH_LINE = re.compile(r"\] (Oops: .*|BUG: .*|RIP: 0010:.*|Kernel panic - .*)$")
# The byte before the trapping address and the byte at it, in an oops's `Code:` line.
CODE_AT = re.compile(r"Code: (?:[0-9a-f]{2} )*([0-9a-f]{2}) <([0-9a-f]{2})>")


def guest_crash(vm_said: VmEnd) -> list[str]:
    """How vng ended, then either the guest kernel's crash lines (the first Oops/BUG, where,
    and the panic) or, when there are none, the last lines printed."""
    crash = []
    for line in vm_said.printed:
        found = CRASH_LINE.search(line)
        if found and not any(c.split(":")[0] == found.group(1).split(":")[0] for c in crash):
            crash.append(found.group(1))
    tail = [line for line in vm_said.printed if line.strip()][-5:]
    return [vm_said.how, *(crash or tail)]


def emulator_fault(vm_said: VmEnd) -> str | None:
    """Whether the guest kernel died of an int3 that is not in its memory. The kernel patches
    its own text (static keys when tracing is switched on or off, ftrace for kprobes) with a
    temporary int3, and QEMU's TCG can run the other vCPU on the bytes from before the patch
    finished. The oops's `Code:` line shows memory around the address after the trap, the
    byte there in <>: when the byte before it is no int3 (0xcc), the CPU trapped on code that
    memory no longer held, which hardware does not do. An int3 still in memory is the
    guest's own and is not excused."""
    crash = guest_crash(vm_said)[1:]
    if not any(line.startswith("Oops: int3") for line in crash):
        return None
    code = next(filter(None, map(CODE_AT.search, vm_said.printed)), None)
    if code is None or code.group(1) == "cc":
        return None
    where = next((line for line in crash if line.startswith("RIP:")), "")
    return " ".join(filter(None, ["Oops: int3", where])) + ", no int3 in memory there"


def failure_lines(log: str, per_failure: int = 12) -> list[str]:
    """pytest's FAILED/ERROR lines, each followed by its failure's `E ...` lines (the
    assertion and the values), which otherwise sit far above the tail CI shows."""
    explained: dict[str, list[str]] = {}
    current = None
    for line in log.splitlines():
        header = re.match(r"_+ (?:ERROR at \w+ of )?(\S+) _+$", line)
        if header:
            current = explained.setdefault(header.group(1), [])
        elif line.startswith(("=", "-")):  # passes, the summary, a test's captured output
            current = None
        elif current is not None and line.startswith("E ") and len(current) < per_failure:
            current.append(line)
    lines = []
    for line in log.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            lines.append(line)
            test = line.split()[1].split("::", 1)[-1]
            lines += [f"  {e}" for e in explained.get(test, [])]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default=os.environ.get("KERNELS", "6.1 6.12"),
                        help="space-separated kernel names: 6.1, 6.12, newest (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("VM_TIMEOUT", 1800)),
                        help="seconds per kernel before the VM is killed (default: %(default)s)")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--exec", dest="command", help="shell command to run in the guest instead of pytest")
    parser.add_argument("--quiet", action="store_true", help="do not stream the guest's log")
    parser.add_argument("--shared", action="store_true",
                        help="do not wait for other VMs on this machine (timing tests may then fail)")
    parser.add_argument("--qemu-opts", default=os.environ.get("QEMU_OPTS", ""),
                        help="extra QEMU arguments, e.g. \"-icount shift=3,sleep=off\" for a guest clock that "
                             "counts instructions instead of following the host (default: none)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="after --: extra pytest arguments (default: tests/kernel)")
    args = parser.parse_args()
    extra = [a for a in args.pytest_args if a != "--"]
    command = args.command or "python3 -m pytest -p no:cacheprovider -v -rPfE " + " ".join(
        shlex.quote(a) for a in (extra or ["tests/kernel"]))
    summaries = []
    all_ok = True
    for name in args.kernels.split():
        ok, summary = run_kernel(name, command, args.timeout, args.memory, args.quiet, args.shared,
                                 args.qemu_opts)
        all_ok &= ok
        summaries.append(summary)
        print(summary, flush=True)
    print("\n".join(["", "summary:", *summaries]))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
