#!/usr/bin/env python3
"""Run a command (by default the kernel test suite) inside one VM per Debian kernel.

    testbed/run_vm.py --kernels "6.1 6.12 newest"               # pytest tests/kernel
    testbed/run_vm.py --kernels 6.12 -- -k smoke -x              # extra pytest arguments
    testbed/run_vm.py --kernels 6.1 --exec "python3 bench/failover.py"

Each VM is virtme-ng under QEMU TCG (KVM aborts on these machines) with the host's root
filesystem copy-on-write and 2 GiB. The guest writes its log, exit code and dmesg into a
results directory shared with --rwdir; the host follows the log live, then prints one
summary line per kernel, with each failed test's assertion lines under it. The run fails
if any kernel's command fails, times out, its dmesg shows BUG:/WARNING:/Oops, or its guest
kernel dies. The guest kernel's console is kept in vng.log and watched (testbed/vmlib.py): a
panic, Oops or BUG ends the VM within seconds and its crash lines are named in the summary.
A VM that ends before its guest starts the command (QEMU has crashed while booting) boots
once more, and so does one whose guest kernel died, before its command finished, of an int3
that QEMU's emulation of self-patching kernel code left behind (vmlib.emulator_fault); the
summary line says so and names the first run's log.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels  # noqa: E402
import vmlib  # noqa: E402

REPO = kernels.REPO
RESULTS = vmlib.RESULTS
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
    vng, env = vmlib.vng("run_vm")
    # --verbose: the guest kernel's console goes to vng.log, so a guest that panics says why.
    argv = [vng, "-r", str(vmlinuz), "--disable-kvm", "--verbose", "-m", memory, "--rwdir", str(out),
            *(["--qemu-opts", qemu_opts] if qemu_opts else []), "--", str(script)]
    lock = vmlib.vm_lock("run_vm", shared)
    started = time.monotonic()
    notes = []
    try:
        vm_said = attempt(argv, env, timeout, out, name, quiet)
        died = vmlib.death(vm_said.printed)
        # The guest writes its log first and its rc when the command has finished.
        again = vmlib.once_more((out / "log").exists(), (out / "rc").exists(), vm_said.timed_out, died)
        if again:
            if died is not None:
                kept = out / "log.1"
                if (out / "log").exists():
                    (out / "log").replace(kept)
                notes.append(died.rerun_note(kept if kept.exists() else out / "vng.log"))
            else:
                notes.append(f"{again} ({vm_said.how}), booted once more")
            print(f"run_vm: {again} ({'; '.join(guest_crash(vm_said))}); running the {name} VM once more",
                  flush=True)
            vm_said = attempt(argv, env, timeout, out, name, quiet)
    finally:
        lock.close()
    wall = time.monotonic() - started
    rc_file = out / "rc"
    rc = int(rc_file.read_text()) if rc_file.exists() and rc_file.read_text().strip() else None
    dmesg = (out / "dmesg").read_text(errors="replace") if (out / "dmesg").exists() else ""
    bad = [line for line in dmesg.splitlines() if DMESG_BAD.search(line)]
    died = vmlib.death(vm_said.printed)
    why = []
    if rc is None:
        why += ["no exit code from the guest", *guest_crash(vm_said), f"vng's output and the guest's console in "
                f"{out / 'vng.log'}"]
    elif rc:
        why.append(f"exit code {rc}")
    if bad:
        why.append(f"dmesg: {bad[0].strip()}")
    failed, note = vmlib.judge(rc is not None, died)
    if failed and rc is not None:  # otherwise named above, under "no exit code"
        why.append(f"{failed} (console in {out / 'vng.log'})")
    notes += [note] if note else []
    ok = not why
    verdict = "passed" if ok else "FAILED (" + "; ".join(why) + ")"
    summary = f"kernel {name} ({release}): {verdict} in {wall:.1f} s" + "".join(f" [{r}]" for r in notes)
    # CI shows only the tail of a long log: repeat pytest's failure lines under the verdict.
    log = (out / "log").read_text(errors="replace") if (out / "log").exists() else ""
    return ok, "\n".join([summary, *(f"    {line[:300]}" for line in failure_lines(log))])


class VmEnd(NamedTuple):
    how: str              # "vng exit code N", "stopped: the guest kernel died" or "timed out after N s"
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
    """Run one VM until it exits, its guest kernel dies (its console is watched: seconds,
    not the timeout) or `timeout`; return how it ended and every line it and the guest's
    console printed, which are also appended to `vng_log`. (vng exits 255 even when the
    guest's command succeeded: the guest's own exit code is in `rc`.)"""
    vm = vmlib.Vm(argv, env, vng_log)
    try:
        ended = vm.watch(timeout)
        if ended == "timeout":
            vm.kill()
            how = f"timed out after {timeout:.0f} s"
        else:
            vm.close()
            how = (f"vng exit code {vm.proc.returncode}" if vm.proc.returncode >= 0
                   else "stopped: the guest kernel died")
    finally:
        if vm.proc.poll() is None:  # interrupted (Ctrl-C): the VM goes with us
            vm.kill()
    vm.note(how)
    return VmEnd(how, how.startswith("timed out"), list(vm.console.lines))


def guest_crash(vm_said: VmEnd) -> list[str]:
    """How vng ended, then either the guest kernel's crash lines (the first Oops/BUG, where,
    and the panic) or, when there are none, the last lines printed."""
    tail = [line for line in vm_said.printed if line.strip()][-5:]
    return [vm_said.how, *(vmlib.crash_lines(vm_said.printed) or tail)]


def emulator_fault(vm_said: VmEnd) -> str | None:
    """See vmlib.emulator_fault."""
    return vmlib.emulator_fault(vm_said.printed)


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
