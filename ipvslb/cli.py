"""Command line: `ipvslb run | check-config | status | drain | undrain | events`."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ipvslb import __version__

DEFAULT_CONFIG = "/etc/ipvslb/config.yaml"
DEFAULT_STATUS_SOCKET = "/run/ipvslb/status.sock"
DEFAULT_CONTROL_SOCKET = "/run/ipvslb/control.sock"
WAIT_TIMEOUT_EXIT = 3   # `drain --wait`: connections still active at the timeout


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

    run = sub.add_parser("run", help="run the daemon: reconcile IPVS, trace connections, quarantine failing backends")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    run.set_defaults(handler=_run)


    status = sub.add_parser("status", help="show services, backends, health states and weights of the running daemon")
    _add_daemon_options(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON document, for scripts")
    status.set_defaults(handler=_status)

    drain = sub.add_parser(
        "drain", help="take a backend out of rotation without a configuration change: weight 0 in IPVS, "
        "established connections go on",
        description="Set the backend's weight to 0 in IPVS until `ipvslb undrain`: no new connections go to "
        "it, established ones go on. The drain is kept in the state directory: it holds across restarts and "
        "reloads, and ends when a reload removes the backend. Health checking goes on meanwhile. "
        f"Exit status: 0 done, 1 error (the message names it), {WAIT_TIMEOUT_EXIT} --wait timed out with "
        "connections still active (the backend stays drained).")
    _add_backend_arguments(drain)
    drain.add_argument("--wait", action="store_true",
                       help="then wait until the backend has no active connections left in IPVS")
    drain.add_argument("--timeout", type=float, metavar="SECONDS",
                       help=f"with --wait: give up after this long, exit status {WAIT_TIMEOUT_EXIT} "
                       "(default: wait without a limit)")
    drain.set_defaults(handler=_drain)

    undrain = sub.add_parser("undrain", help="end a drain: the backend gets the weight health wants again",
                             description="End `ipvslb drain`: the backend gets the weight its health state "
                             "wants (the configured one when healthy). Exit status: 0 done, 1 error.")
    _add_backend_arguments(undrain)
    undrain.set_defaults(handler=_drain)

    events = sub.add_parser("events",
                            help="stream decoded connection events for the configured VIPs (needs root, BPF)")
    events.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"configuration naming the VIPs (default {DEFAULT_CONFIG})")
    events.add_argument("--vip", action="append", default=[], metavar="PROTO:ADDR:PORT",
                        help="watch this VIP instead of the configured ones, e.g. tcp:10.0.0.1:80 or "
                        "tcp:[fd00::1]:80; repeatable")
    events.add_argument("--no-kprobe", action="store_true",
                        help="attribute backends from /proc/net/ip_vs_conn instead of the ip_vs_conn_new kprobe")
    events.set_defaults(handler=_events)
    return parser


def _add_daemon_options(command: argparse.ArgumentParser) -> None:
    """--config and --socket, for the commands that talk to a running daemon."""
    command.add_argument("--config", default=DEFAULT_CONFIG,
                         help="the daemon's configuration, whose settings.status_socket is used "
                         f"(default {DEFAULT_CONFIG})")
    command.add_argument("--socket", help="status socket, instead of the one the configuration sets "
                         f"(its default: {DEFAULT_STATUS_SOCKET})")


def _add_backend_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("service", metavar="SERVICE", help="the service's name in the configuration")
    command.add_argument("backend", metavar="BACKEND",
                         help="the backend as ADDR:PORT ([ADDR]:PORT for IPv6), or ADDR when the service has one "
                         "backend at that address")
    command.add_argument("--config", default=DEFAULT_CONFIG,
                         help="the daemon's configuration, whose settings.control_socket is used "
                         f"(default {DEFAULT_CONFIG})")
    command.add_argument("--socket", help="control socket, instead of the one the configuration sets "
                         f"(its default: {DEFAULT_CONTROL_SOCKET})")


def _daemon_socket(args: argparse.Namespace, control: bool = False) -> str | None:
    """The socket given with --socket, else the one --config's file sets (the status
    socket, or the control socket); None after a one-line error when that file does not load."""
    if args.socket:
        return args.socket
    from ipvslb import config

    try:
        settings = config.load(args.config).settings
        return settings.control_path() if control else settings.status_socket
    except config.ConfigError as err:
        more = len(err.messages) - 1
        rest = f" (and {more} more: `ipvslb check-config {args.config}`)" if more else ""
        print(f"ipvslb: cannot take the {'control' if control else 'status'} socket from the configuration "
              f"(or pass --socket): {err.messages[0]}{rest}", file=sys.stderr)
        return None


def _drain(args: argparse.Namespace) -> int:
    """`drain` and `undrain`: one request on the control socket, then for `drain --wait`
    a look at the backend's active connections every WAIT_POLL seconds."""
    import time

    from ipvslb import control

    wait = getattr(args, "wait", False)
    if getattr(args, "timeout", None) is not None and not wait:
        print("ipvslb: --timeout goes with --wait", file=sys.stderr)
        return 2
    path = _daemon_socket(args, control=True)
    if path is None:
        return 1
    started = time.monotonic()
    try:
        first = control.request(path, args.command, args.service, args.backend)
    except control.ControlError as err:
        print(f"ipvslb: {args.command} {args.service} {args.backend}: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"ipvslb: cannot reach the daemon's control socket {path}: {err.strerror or err}. "
              "Is `ipvslb run` running?", file=sys.stderr)
        return 1
    done = "drained" if first["drained"] else "undrained"
    print(f"{first['service']} {first['backend']}: {done if first.get('changed') else 'already ' + done}, "
          f"weight {first.get('weight', '?')}, {first.get('active_connections', '?')} active connections",
          flush=True)
    if not wait:
        return 0
    answer: dict | None = first
    deadline = None if args.timeout is None else started + args.timeout
    while answer is None or answer.get("active_connections") != 0:
        if deadline is not None and time.monotonic() >= deadline:
            active = "?" if answer is None else answer.get("active_connections", "?")
            print(f"ipvslb: drain {args.service} {args.backend}: {active} active connections still after "
                  f"{args.timeout:g} s; the backend stays drained", file=sys.stderr)
            return WAIT_TIMEOUT_EXIT
        time.sleep(WAIT_POLL)
        try:
            answer = control.request(path, "drained", args.service, args.backend)
        except control.ControlError as err:
            print(f"ipvslb: drain {args.service} {args.backend}: {err}", file=sys.stderr)
            return 1
        except OSError:
            answer = None   # the daemon restarting: the drain holds, ask again
        if answer is not None and not answer["drained"]:
            print(f"ipvslb: drain {args.service} {args.backend}: undrained while waiting", file=sys.stderr)
            return 1
    assert answer is not None  # the loop ends on an answer with no active connection
    print(f"{answer['service']} {answer['backend']}: no active connections after "
          f"{time.monotonic() - started:.1f} s", flush=True)
    return 0


WAIT_POLL = 0.2   # seconds between `drain --wait`'s looks at the connection count


def _run(args: argparse.Namespace) -> int:
    from ipvslb import daemon, preflight

    problems = preflight.problems()
    if problems:
        # One line, the most basic problem: fixing it may change or clear the others.
        print(f"ipvslb: cannot start: {problems[0]}", file=sys.stderr, flush=True)
        return 1
    return daemon.main(args.config)


def _status(args: argparse.Namespace) -> int:
    import json

    from ipvslb import status

    args.socket = _daemon_socket(args)
    if args.socket is None:
        return 1
    try:
        doc = status.fetch(args.socket)
        text = json.dumps(doc, indent=2) if args.json else status.render(status.parse(doc))
    except OSError as err:
        print(f"ipvslb: cannot reach the daemon at {args.socket}: {err.strerror or err}. Is `ipvslb run` running?",
              file=sys.stderr)
        return 1
    except status.StatusError as err:
        print(f"ipvslb: malformed answer on {args.socket}: {err}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _parse_vip(text: str):
    import ipaddress

    from ipvslb.tracer.records import Vip

    proto, _, rest = text.partition(":")
    addr, _, port = rest.rpartition(":")
    try:
        if proto not in ("tcp", "udp"):
            raise ValueError
        return Vip(proto, ipaddress.ip_address(addr.strip("[]")), int(port))
    except ValueError:
        raise SystemExit(f"ipvslb: --vip {text!r}: expected PROTO:ADDR:PORT, e.g. tcp:10.0.0.1:80") from None


def _events(args: argparse.Namespace) -> int:
    from ipvslb import config, tracer

    if args.vip:
        vips = [_parse_vip(v) for v in args.vip]
        settings = None
    else:
        try:
            cfg = config.load(args.config)
        except config.ConfigError as err:
            print("\n".join(err.messages), file=sys.stderr)
            return 1
        vips = list(cfg.services)
        settings = cfg.settings.tracer
    try:
        # An operator watching wants every connect and close, whatever the daemon's settings.
        settings = dataclasses.replace(settings or tracer.TracerSettings(), report_closed=True,
                                       sample_interval=0.0)
        t = tracer.Tracer(settings, use_kprobe=not args.no_kprobe)
    except tracer.TracerUnavailable as err:
        print(f"ipvslb: {err}", file=sys.stderr)
        return 1
    t.set_vips(vips)
    print(f"# watching {len(vips)} VIPs, backend attribution: {t.attribution}", flush=True)
    try:
        wait_ms = 1000
        while True:
            batch = t.read(timeout_ms=wait_ms)
            for event in batch:
                print(event, flush=True)
            # While records flow, read again within the wakeup interval (see Tracer.fileno).
            wait_ms = max(1, round(t.wakeup_interval * 1000)) if batch else 1000
    except KeyboardInterrupt:
        print(f"# lost records: {t.lost_records()}")
        return 0
    finally:
        t.close()


def _check_config(args: argparse.Namespace) -> int:
    from ipvslb import config

    try:
        cfg = config.load(args.file)
    except config.ConfigError as err:
        for line in err.messages:
            print(line, file=sys.stderr)
        return 1
    for line in config.unit_warnings(cfg, args.file):
        print(line, file=sys.stderr)
    backends = sum(len(s.backends) for s in cfg.services)
    print(f"{args.file}: ok ({len(cfg.services)} services, {backends} backends)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
