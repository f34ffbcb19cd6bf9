#!/usr/bin/env python3
"""Fetch Debian kernels for the VM test bed and make them visible to virtme-ng and bcc.

    python3 testbed/kernels.py fetch 6.1 6.12 newest
    python3 testbed/kernels.py path 6.12        # prints the vmlinuz path

A private apt configuration per suite lives in the cache, so the machine's own apt sources
are never touched. Packages are extracted (not installed) into `.cache/kernels/<suite>/root`;
`/lib/modules/<ver>` is then a symlink into that tree, and its `build` link points at the
extracted headers. A second run downloads nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("IPVSLB_CACHE", REPO / ".cache"))
MIRROR = os.environ.get("IPVSLB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

SUITES = {"6.1": "bookworm", "6.12": "trixie", "newest": "sid"}


def log(msg: str) -> None:
    print(f"kernels: {msg}", file=sys.stderr, flush=True)


class PrivateApt:
    """apt-get/apt-cache bound to a directory of their own for one suite."""

    def __init__(self, suite: str):
        self.suite = suite
        self.root = CACHE / "apt" / suite
        self.debs = CACHE / "debs" / suite

    def _options(self) -> list[str]:
        r = self.root
        return [
            "-o", f"Dir::Etc={r}/etc",
            "-o", f"Dir::Etc::sourcelist={r}/etc/sources.list",
            "-o", f"Dir::Etc::sourceparts={r}/etc/sources.list.d",
            "-o", f"Dir::Etc::preferencesparts={r}/etc/preferences.d",
            "-o", f"Dir::Etc::trustedparts={r}/etc/trusted.gpg.d",
            "-o", f"Dir::State={r}/state",
            "-o", f"Dir::State::status={r}/status",
            "-o", f"Dir::Cache={r}/cache",
            "-o", "APT::Architecture=amd64",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",
        ]

    def setup(self) -> None:
        r = self.root
        for d in ("etc/sources.list.d", "etc/preferences.d", "etc/trusted.gpg.d",
                  "state/lists/partial", "cache/archives/partial"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "status").touch()
        (r / "etc/sources.list").write_text(
            f"deb [signed-by={KEYRING}] {MIRROR} {self.suite} main\n")
        self.debs.mkdir(parents=True, exist_ok=True)

    def update(self) -> None:
        lists = list((self.root / "state/lists").glob("*_Packages*"))
        if lists:
            return
        log(f"apt-get update ({self.suite})")
        subprocess.run(["apt-get", "-q", *self._options(), "update"], check=True,
                       stdout=subprocess.DEVNULL)

    def depends(self, package: str) -> list[str]:
        out = subprocess.run(["apt-cache", *self._options(), "depends", package],
                             check=True, capture_output=True, text=True).stdout
        return [m.group(1) for m in re.finditer(r"^\s+(?:Pre)?Depends: ([^\s<>]+)", out, re.M)]

    def version(self, package: str) -> str:
        out = subprocess.run(["apt-cache", *self._options(), "show", "--no-all-versions", package],
                             check=True, capture_output=True, text=True).stdout
        return re.search(r"^Version: (\S+)", out, re.M).group(1)

    def download(self, package: str) -> Path:
        version = self.version(package)
        # Debian file names encode ':' of an epoch as %3a.
        existing = list(self.debs.glob(f"{package}_{version.split(':')[-1]}_*.deb"))
        if existing:
            return existing[0]
        log(f"download {package} {version}")
        subprocess.run(["apt-get", "-q", *self._options(), "download", package],
                       check=True, cwd=self.debs, stdout=subprocess.DEVNULL)
        return next(self.debs.glob(f"{package}_*.deb"))


def kernel_packages(apt: PrivateApt) -> tuple[str, list[str]]:
    """The kernel release and the packages that make up its image, modules and headers."""
    image = next(d for d in apt.depends("linux-image-amd64") if d.startswith("linux-image-"))
    release = image.removeprefix("linux-image-")
    wanted: list[str] = []
    pending = [image, f"linux-headers-{release}"]
    # Follow only the kernel's own packages: newer suites split the image into
    # linux-binary-*/linux-modules-*, the headers pull in -common and linux-kbuild.
    own = re.compile(r"^linux-(image|binary|modules|headers|kbuild)-")
    while pending:
        pkg = pending.pop()
        if pkg in wanted:
            continue
        wanted.append(pkg)
        pending += [d for d in apt.depends(pkg) if own.match(d) and d not in wanted]
    return release, wanted


def extract(debs: list[Path], root: Path) -> None:
    stamp = root / ".extracted"
    names = "\n".join(sorted(d.name for d in debs))
    if stamp.exists() and stamp.read_text() == names:
        return
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        log(f"extract {deb.name}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    stamp.write_text(names)


def modules_dir(root: Path, release: str) -> Path:
    for base in ("usr/lib/modules", "lib/modules"):
        if (root / base / release).is_dir():
            return root / base / release
    raise SystemExit(f"kernels: no modules for {release} under {root}")


def vmlinuz_path(root: Path, release: str) -> Path:
    for candidate in (root / "boot" / f"vmlinuz-{release}", modules_dir(root, release) / "vmlinuz"):
        if candidate.exists():
            return candidate
    raise SystemExit(f"kernels: no vmlinuz for {release} under {root}")


def link(path: Path, target: Path) -> None:
    if path.is_symlink() and os.readlink(path) == str(target):
        return
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        log(f"{path} exists and is not our symlink; leaving it alone")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def publish(root: Path, release: str) -> None:
    """Make modules visible at /lib/modules/<release> and headers at its build link."""
    mods = modules_dir(root, release)
    # The packages' build/source links may be absolute (/usr/src/...): re-point them into
    # the extracted tree. bcc reads kconfig.h and friends from `source` (the -common headers).
    for name in ("build", "source"):
        entry = mods / name
        if entry.is_symlink() and os.path.isabs(target := os.readlink(entry)) and not target.startswith(str(root)):
            entry.unlink()
            entry.symlink_to(root / target.lstrip("/"))
    link(Path("/lib/modules") / release, mods)
    if not (mods / "modules.dep.bin").exists():
        log(f"depmod {release}")
        # Through the published /lib/modules link: newer kernels ship modules under
        # /usr/lib/modules, which bookworm's depmod does not look for below -b.
        subprocess.run(["depmod", release], check=True)


def fetch(name: str) -> Path:
    suite = SUITES.get(name, name)
    apt = PrivateApt(suite)
    apt.setup()
    apt.update()
    release, packages = kernel_packages(apt)
    root = CACHE / "kernels" / suite
    current = root / ".release"
    if current.exists() and current.read_text() == release and (root / ".extracted").exists():
        publish(root, release)
        return vmlinuz_path(root, release)
    debs = [apt.download(p) for p in packages]
    extract(debs, root)
    current.write_text(release)
    publish(root, release)
    return vmlinuz_path(root, release)


def release_of(name: str) -> str:
    suite = SUITES.get(name, name)
    current = CACHE / "kernels" / suite / ".release"
    if not current.exists():
        raise SystemExit(f"kernels: {name} is not fetched; run: testbed/kernels.py fetch {name}")
    return current.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and publish kernels (6.1, 6.12, newest or a suite name)")
    f.add_argument("names", nargs="+")
    p = sub.add_parser("path", help="print the vmlinuz of a fetched kernel (fetching it first)")
    p.add_argument("name")
    r = sub.add_parser("release", help="print the release string of a fetched kernel")
    r.add_argument("name")
    args = parser.parse_args()
    if args.cmd == "fetch":
        for name in args.names:
            print(f"{name}: {fetch(name)}")
    elif args.cmd == "path":
        print(fetch(args.name))
    else:
        print(release_of(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
