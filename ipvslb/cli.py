"""Command line: `ipvslb run | check-config | status | events | demo`."""
from __future__ import annotations

import argparse
import sys

from ipvslb import __version__

DEFAULT_CONFIG = "/etc/ipvslb/config.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipvslb",
        description="Client-side layer-4 load balancer: keeps kernel IPVS equal to the "
        "configured services and takes failing backends out of rotation on eBPF evidence.",
    )
    parser.add_argument("--version", action="version", version=f"ipvslb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check-config", help="validate a configuration file; exit 0 if valid, 1 if not")
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    check.set_defaults(handler=_check_config)
    return parser


def _check_config(args: argparse.Namespace) -> int:
    from ipvslb import config

    try:
        cfg = config.load(args.file)
    except config.ConfigError as err:
        for line in err.messages:
            print(line, file=sys.stderr)
        return 1
    backends = sum(len(s.backends) for s in cfg.services)
    print(f"{args.file}: ok ({len(cfg.services)} services, {backends} backends)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
