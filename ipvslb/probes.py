"""The probe of a service's type (`health.probe`, docs/configuration.md), for the
confirmation and re-admission probes and the background checks (ipvslb.activecheck).

`tcp` is ipvslb.probe's TcpProbe: the executor of health's actions makes it itself, so that
its SYN leaves in the step that decided the probe; `run` runs every type. The others talk to the
backend after a TcpProbe's handshake (http, https, tls, dns over TCP), send one datagram
(udp, dns over UDP) or run a program (exec); they run as coroutines on the event loop
(asyncio streams, the ssl module, asyncio subprocesses) and at most MAX_RUNNING at once.

Every probe ends in a `probe.ProbeOutcome`. `refused` (the backend answered, so this host's
path to it works) is set for any failure after a completed TCP handshake: a 503, a
certificate that does not verify, a reply too late. `local` (no evidence against the
backend) for failures on this host: no socket, no free slot in time, a CA file that cannot
be read, a program that cannot be started.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable

from ipvslb import model, probe, udprequest
from ipvslb.model import Endpoint, IPAddress, ProbeSettings, format_endpoint
from ipvslb.probe import ProbeOutcome

__all__ = ["ProbeOutcome", "kind", "run", "timeout"]

# Probes other than `tcp` that run at once, over all services; further ones wait for a
# slot within their timeout. A connect probe is not counted: its SYN leaves when the
# engine decides, and it holds nothing but a socket.
MAX_RUNNING = 32
# Bytes read of an HTTP answer looking for the end of its status line.
MAX_STATUS_LINE = 4096
# Bytes of an exec probe's standard error kept for its detail.
MAX_STDERR = 200
# The PATH an exec probe's program gets (its environment is built, not inherited).
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()
_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}


def kind(service: model.Service) -> str:
    """The probe type: the configured one, else the service's protocol."""
    return service.health.probe.type or service.protocol


def timeout(service: model.Service, engine_timeout: float) -> float:
    """A probe's time: the configured `timeout`, else the engine's (StartProbe.timeout)."""
    return service.health.probe.timeout or engine_timeout


async def run(service: model.Service, backend: Endpoint, seconds: float, ident: int = 0) -> ProbeOutcome:
    """Run one probe of `service`'s type against `backend` within `seconds`, waiting for
    one of the MAX_RUNNING slots first (`tcp` takes no slot)."""
    address, port = backend
    settings = service.health.probe
    started = time.monotonic()
    t = kind(service)
    if t == "tcp":
        return await probe.probe_tcp(address, port, seconds)
    slots = _slots.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(MAX_RUNNING))
    left = seconds
    if slots.locked():  # all taken: what the wait for one costs comes off the probe's time
        try:
            async with asyncio.timeout(seconds):
                await slots.acquire()
        except TimeoutError:
            return ProbeOutcome(False, f"no free probe slot within {seconds * 1000:.0f} ms ({MAX_RUNNING} running)",
                                time.monotonic() - started, local=True)
        left = max(0.0, seconds - (time.monotonic() - started))
    else:
        await slots.acquire()  # free: taken at once
    try:
        if t == "udp":
            return await probe.probe_udp(address, port, left, udprequest.for_service(service, ident))
        if t in ("http", "https"):
            return await probe_http(address, port, left, settings, tls=t == "https")
        if t == "tls":
            return await probe_tls(address, port, left, settings)
        if t == "dns":
            return await probe_dns(address, port, left, settings, ident)
        if t == "exec":
            return await probe_exec(service.name, address, port, left, settings)
        raise ValueError(f"unknown probe type {t!r}")
    finally:
        slots.release()


# --- over TCP ----------------------------------------------------------------------------

async def _talk(address: IPAddress, port: int, seconds: float, server_name: str | None,
                settings: ProbeSettings | None, exchange: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                                   Awaitable[tuple[bool, str]]],
                what: str) -> ProbeOutcome:
    """A TcpProbe's handshake, TLS over it when `settings` is given, then `exchange`, all
    within `seconds`. The socket is closed with RST (no TIME_WAIT) whatever happens."""
    started = time.monotonic()
    try:
        tcp = probe.TcpProbe(address, port)
    except OSError as err:
        return probe.failure(err, time.monotonic() - started, immediate=True)
    writer: asyncio.StreamWriter | None = None
    try:
        connected = await tcp.connected(seconds)
        if not connected.ok:
            return connected
        context = None
        if settings is not None:
            try:
                context = await _context(settings.verify, settings.ca_file)
            except (OSError, ssl.SSLError) as err:
                return ProbeOutcome(False, f"no TLS context: {err}", time.monotonic() - started, local=True)
        stage = "TLS handshake" if context is not None else what
        try:
            async with asyncio.timeout(max(0.0, seconds - (time.monotonic() - started))):
                # The stream owns the socket from here; closing the writer closes it.
                tcp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, probe.RESET_ON_CLOSE)
                reader, writer = await asyncio.open_connection(
                    sock=tcp.sock, ssl=context, server_hostname=server_name if context is not None else None,
                    ssl_handshake_timeout=max(0.001, seconds - (time.monotonic() - started)) if context else None)
                stage = what
                ok, detail = await exchange(reader, writer)
        except TimeoutError:
            return ProbeOutcome(False, f"connected, no {stage} within {seconds * 1000:.0f} ms",
                                time.monotonic() - started, refused=True)
        except ssl.SSLCertVerificationError as err:
            return ProbeOutcome(False, f"certificate not trusted: {err.verify_message}",
                                time.monotonic() - started, refused=True)
        except (OSError, ssl.SSLError, EOFError, asyncio.IncompleteReadError) as err:
            return ProbeOutcome(False, f"connected, {stage} failed: {_describe(err)}",
                                time.monotonic() - started, refused=True)
        return ProbeOutcome(ok, detail, time.monotonic() - started, refused=not ok)
    finally:
        if writer is not None:
            writer.transport.abort()
        tcp.sock.close()


async def _context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """One context per (verify, CA file), made in a thread: loading the trusted CAs reads
    files and takes milliseconds the event loop would otherwise wait."""
    key = (verify, ca_file)
    if key not in _contexts:
        _contexts[key] = await asyncio.to_thread(_new_context, verify, ca_file)
    return _contexts[key]


def _new_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file)


def _host(address: IPAddress, port: int, settings: ProbeSettings, tls: bool) -> str:
    if settings.host is not None:
        return settings.host
    default = 443 if tls else 80
    text = f"[{address}]" if address.version == 6 else str(address)
    return text if port == default else format_endpoint((address, port))


def _server_name(address: IPAddress, settings: ProbeSettings) -> str:
    if settings.server_name is not None:
        return settings.server_name
    host = settings.host
    if host is None:
        return str(address)
    if host.startswith("[") and "]" in host:  # [fd00::1]:443
        return host[1:host.index("]")]
    return host.split(":")[0] if host.count(":") == 1 else host  # name:443; a bare IPv6 address


async def probe_http(address: IPAddress, port: int, seconds: float, settings: ProbeSettings,
                     tls: bool) -> ProbeOutcome:
    """One HTTP/1.1 request with `Connection: close`; passes on an expected status code."""
    request = (f"{settings.method} {settings.path} HTTP/1.1\r\nHost: {_host(address, port, settings, tls)}\r\n"
               f"User-Agent: ipvslb-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode("ascii")
    expected = settings.expect_status

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bool, str]:
        writer.write(request)
        await writer.drain()
        line = await _status_line(reader)
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
            return False, f"not an HTTP answer: {line[:60]!r}"
        status = int(parts[1])
        reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
        ok = 200 <= status <= 399 if expected is None else status in expected
        return ok, f"HTTP {status} {reason}".rstrip()

    return await _talk(address, port, seconds, _server_name(address, settings), settings if tls else None,
                       exchange, "HTTP answer")


async def _status_line(reader: asyncio.StreamReader) -> bytes:
    """The first line of the answer, reading at most MAX_STATUS_LINE bytes."""
    data = b""
    while b"\n" not in data and len(data) < MAX_STATUS_LINE:
        chunk = await reader.read(MAX_STATUS_LINE - len(data))
        if not chunk:
            if not data:
                raise EOFError("closed without an answer")
            break
        data += chunk
    return data.split(b"\n", 1)[0].rstrip(b"\r")


async def probe_tls(address: IPAddress, port: int, seconds: float, settings: ProbeSettings) -> ProbeOutcome:
    """A TCP and TLS handshake (the certificate checked unless `verify: false`)."""
    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bool, str]:
        ssl_object = writer.get_extra_info("ssl_object")
        return True, f"TLS handshake ({ssl_object.version() if ssl_object else 'TLS'})"

    return await _talk(address, port, seconds, _server_name(address, settings), settings, exchange, "TLS handshake")


# --- DNS ---------------------------------------------------------------------------------

def dns_request(settings: ProbeSettings, ident: int) -> udprequest.UdpRequest:
    """The query of a `dns` probe and the verdict on its reply (udprequest's encoder)."""
    query = udprequest.dns_query(settings.query_name, ident, model.DNS_TYPES[settings.query_type])
    names = {code: name for name, code in model.DNS_RCODES.items()}
    wanted = {model.DNS_RCODES[name] for name in settings.expect_rcodes}

    def judge(reply: bytes) -> str | None:
        rcode = udprequest.dns_rcode(ident, reply)
        if isinstance(rcode, str):
            return rcode
        return None if rcode in wanted else f"DNS {names.get(rcode, f'rcode {rcode}')}"
    return udprequest.UdpRequest(query, judge, f"DNS reply for {settings.query_name} {settings.query_type}")


async def probe_dns(address: IPAddress, port: int, seconds: float, settings: ProbeSettings,
                    ident: int) -> ProbeOutcome:
    request = dns_request(settings, ident)
    if settings.transport == "udp":
        return await probe.probe_udp(address, port, seconds, request)

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bool, str]:
        writer.write(len(request.payload).to_bytes(2, "big") + request.payload)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        # The header holds all the verdict needs.
        reply = await reader.readexactly(min(size, 12))
        wrong = request.judge(reply)
        return wrong is None, wrong or request.what

    return await _talk(address, port, seconds, None, None, exchange, "DNS reply")


# --- exec --------------------------------------------------------------------------------

async def probe_exec(service: str, address: IPAddress, port: int, seconds: float,
                     settings: ProbeSettings) -> ProbeOutcome:
    """Run the command without a shell, in its own session (so that a kill at the timeout
    reaches whatever it started); exit status 0 passes."""
    started = time.monotonic()
    env = {"PATH": EXEC_PATH, "IPVSLB_SERVICE": service, "IPVSLB_BACKEND_ADDRESS": str(address),
           "IPVSLB_BACKEND_PORT": str(port)}
    try:
        proc = await asyncio.create_subprocess_exec(
            *settings.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True, close_fds=True)
    except OSError as err:
        return ProbeOutcome(False, f"cannot run {settings.command[0]}: {_describe(err)}",
                            time.monotonic() - started, local=True)
    stderr = bytearray()

    async def collect() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(4096):
            stderr.extend(chunk[:max(0, MAX_STDERR - len(stderr))])

    try:
        async with asyncio.timeout(max(0.0, seconds - (time.monotonic() - started))):
            await asyncio.gather(collect(), proc.wait())
    except TimeoutError:
        return ProbeOutcome(False, f"{settings.command[0]} still running after {seconds * 1000:.0f} ms, killed",
                            time.monotonic() - started)
    finally:
        if proc.returncode is None:
            _kill(proc.pid)
            await proc.wait()
    elapsed = time.monotonic() - started
    code = proc.returncode
    assert code is not None  # waited for above
    if code == 0:
        return ProbeOutcome(True, "exit 0", elapsed)
    said = stderr.decode("utf-8", "replace").strip().splitlines()
    status = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    return ProbeOutcome(False, status + (f": {said[0][:MAX_STDERR]}" if said else ""), elapsed)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno:
        return probe._describe(err)
    return str(err) or type(err).__name__
