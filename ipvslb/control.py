"""The control socket: a root-only unix socket (settings.control_socket) through which
`ipvslb drain` and `ipvslb undrain` change the running daemon.

One request per connection: one line of JSON in, one line of JSON out, then the daemon
closes the connection.

    {"command": "drain" | "undrain" | "drained", "service": NAME, "backend": "ADDR:PORT"}
    -> {"ok": true, "service": NAME, "backend": "ADDR:PORT", "drained": BOOL, "changed": BOOL,
        "weight": N, "active_connections": N, "inactive_connections": N}
    -> {"ok": false, "error": "what was wrong"}

`drain` and `undrain` answer with the state after the change (`changed` false: it was so
already), `drained` with the state now (the connection counts are IPVS's). BACKEND may be a
bare address when only one of the service's backends has it; IPv6 is written [ADDR]:PORT. A request longer than
MAX_REQUEST_BYTES, one that is not complete within READ_TIMEOUT seconds, or one that is not
such a JSON object gets an error answer; nothing a client sends reaches the daemon's state
unchecked, and a fault in a request's handling is answered, never raised into the loop.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ipvslb import status
from ipvslb.model import Endpoint, Service, format_endpoint

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
READ_TIMEOUT = 5.0
MAX_CLIENTS = 16   # connections served at once; more are told to come back
MAX_ANSWER_BYTES = 1 << 20
LINGER = 1.0                  # seconds, and bytes, read and dropped after the answer
MAX_DISCARD_BYTES = 4 << 20
COMMANDS = ("drain", "undrain", "drained")


class RequestError(ValueError):
    """The request is malformed or names what is not configured; the message says which."""


class ControlError(RuntimeError):
    """The daemon answered {"ok": false} or something that is not an answer (client side)."""


class Request(NamedTuple):
    command: str
    service: Service
    backend: Endpoint


def parse(data: bytes, services: Sequence[Service]) -> Request:
    """The request in `data` (one JSON line), checked against the configured services."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8 text") from None
    except (ValueError, RecursionError) as err:
        raise RequestError(f"request is not JSON: {str(err)[:100]}") from None
    if not isinstance(doc, dict):
        raise RequestError(f"request is a JSON {type(doc).__name__}, expected an object with command, service, "
                           "backend")
    unknown = sorted(str(k)[:40] for k in doc.keys() - {"command", "service", "backend"})
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} in request, expected command, service, backend")
    command, name, backend = doc.get("command"), doc.get("service"), doc.get("backend")
    if command not in COMMANDS:
        raise RequestError(f"command {_shown(command)}: expected one of {', '.join(COMMANDS)}")
    if not isinstance(name, str):
        raise RequestError(f"service {_shown(name)}: expected a service name")
    if not isinstance(backend, str):
        raise RequestError(f"backend {_shown(backend)}: expected ADDR:PORT")
    service = next((s for s in services if s.name == name), None)
    if service is None:
        raise RequestError(f"no service {_shown(name)} in the configuration "
                           f"(services: {_listed(s.name for s in services)})")
    return Request(command, service, _backend(service, backend))


def execute(req: Request, manager) -> dict:
    """Carry out a parsed request on the IPVS manager (ipvslb.ipvs.Manager); the answer."""
    # Here, not at the top: `ipvslb drain` imports this module, and netlink's modules
    # (pyroute2) would cost it seconds on a slow host.
    from ipvslb.ipvs.specs import ip, service_spec

    key = (req.service.key, req.backend)
    before = key in manager.drains
    if req.command != "drained":
        try:
            manager.drain(req.service.key, req.backend, req.command == "drain")
        except OSError as err:
            return _error(f"{req.command} of {format_endpoint(req.backend)} in {req.service.name} failed: "
                          f"{err.strerror or err}")
    changed = (key in manager.drains) != before
    if changed:
        log.warning("%s %s: %s by request on the control socket", req.service.name, format_endpoint(req.backend),
                    "drained" if req.command == "drain" else "undrained")
    answer = {"ok": True, "service": req.service.name, "backend": format_endpoint(req.backend),
              "drained": key in manager.drains, "changed": changed}
    try:
        dests = manager.ipvs.dests(service_spec(req.service), stats=True)
    except OSError as err:
        answer["error"] = f"no connection counts from IPVS: {err.strerror or err}"
        return answer
    for d in dests:
        if (ip(d.spec.address), d.spec.port) == req.backend:
            answer.update(weight=d.spec.weight, active_connections=d.active_conns,
                          inactive_connections=d.inactive_conns)
    return answer


def _backend(service: Service, text: str) -> Endpoint:
    addr, sep, port_text = text.rpartition(":")
    port: str | None = port_text
    if not sep or ":" in addr and not addr.startswith("["):  # a bare address (IPv6 has colons)
        addr, port = text, None
    try:
        address = ipaddress.ip_address(addr.removeprefix("[").removesuffix("]"))
        number = None if port is None else int(port, 10)
    except ValueError:
        raise RequestError(f"backend {_shown(text)}: expected ADDR:PORT, e.g. 10.0.1.11:8443 or [fd00::11]:8443") \
            from None
    found = [b.key for b in service.backends if b.address == address and number in (None, b.port)]
    if len(found) != 1:
        problem = "has no backend" if not found else "has several backends at"
        raise RequestError(f"service {service.name} {problem} {_shown(text)} "
                           f"(backends: {_listed(format_endpoint(b.key) for b in service.backends)})")
    return found[0]


def _shown(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _listed(names) -> str:
    names = list(names)
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "none"


# -- server ------------------------------------------------------------------------------

async def serve(path: str, handle: Callable[[bytes], dict]) -> asyncio.AbstractServer:
    """Serve `handle` (the request's bytes -> the answer) at `path`, root-only like the
    status socket. SocketPathTaken or OSError when the path cannot be used."""
    clients = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        clients += 1
        try:
            if clients > MAX_CLIENTS:
                reply = _error(f"busy: {MAX_CLIENTS} requests in progress, try again")
            elif not _peer_allowed(writer):
                reply = _error("only root (or the daemon's user) may use the control socket")
            else:
                reply = await _answer(reader, handle)
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
            # Closing with unread input would reset the connection, and the client could
            # lose the answer (to a request too long, say): read what it still sends, a bounded amount.
            writer.write_eof()
            await asyncio.wait_for(_discard(reader), LINGER)
        except (TimeoutError, OSError):
            pass   # the client left or does not read: nothing to tell it
        finally:
            clients -= 1
            writer.close()

    return await status.listen(path, answer, "control_socket")


async def _answer(reader: asyncio.StreamReader, handle: Callable[[bytes], dict]) -> dict:
    try:
        data = await asyncio.wait_for(_read_line(reader), READ_TIMEOUT)
    except TimeoutError:
        return _error(f"request not complete within {READ_TIMEOUT:g} s")
    except RequestError as err:
        return _error(str(err))
    try:
        return handle(data)
    except RequestError as err:
        return _error(str(err))
    except Exception as err:  # a bug: the client hears of it, the daemon goes on
        log.error("control request %r failed: %r", data[:200], err, exc_info=err)
        return _error(f"internal error: {err!r}"[:300])


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await reader.read(MAX_REQUEST_BYTES + 1 - len(data))
        if not chunk:
            if not data.strip():
                raise RequestError("no request: the connection closed before a line was sent")
            break   # a last line without its newline is still a request
        data += chunk
        if len(data) > MAX_REQUEST_BYTES and b"\n" not in data:
            raise RequestError(f"request longer than {MAX_REQUEST_BYTES} bytes")
    return data.split(b"\n", 1)[0]


async def _discard(reader: asyncio.StreamReader) -> None:
    left = MAX_DISCARD_BYTES
    while left > 0 and (chunk := await reader.read(min(left, 65536))):
        left -= len(chunk)


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """The socket's mode (0600) already keeps others out; this holds even if its directory
    or mode were changed by hand."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return False
    return uid in (0, os.geteuid())


def _error(message: str) -> dict:
    return {"ok": False, "error": message}


# -- client ------------------------------------------------------------------------------

def request(path: str, command: str, service: str, backend: str, timeout: float = 10.0) -> dict:
    """Send one request; the answer when it is {"ok": true}. ControlError with the daemon's
    message otherwise, OSError when the socket cannot be reached."""
    line = json.dumps({"command": command, "service": service, "backend": backend}).encode() + b"\n"
    try:
        data = status.ask(path, line, MAX_ANSWER_BYTES, timeout)
    except status.AnswerTooLong as err:
        raise ControlError(f"{err}: not an ipvslb control socket") from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError too
        raise ControlError("the answer is not JSON: not an ipvslb control socket") from None
    if not isinstance(doc, dict) or "ok" not in doc:
        raise ControlError("the answer is not a control answer: not an ipvslb control socket")
    if doc["ok"] is not True:
        raise ControlError(str(doc.get("error", "refused without a reason")))
    return doc
