"""Probe types against real servers on this host's loopback: HTTP, TLS (a certificate made
at test time with the openssl command), DNS over UDP and TCP, programs (no VM needed)."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from ipvslb import model, probes

LOCALHOST = ipaddress.ip_address("127.0.0.1")


def service(protocol: str = "tcp", **probe) -> model.Service:
    return model.Service("web", protocol, ipaddress.ip_address("10.0.0.1"), 80,
                         (model.Backend(LOCALHOST, 80),),
                         health=model.HealthSettings(probe=model.ProbeSettings(**probe)))


def run_probe(svc: model.Service, port: int, timeout: float = 2.0, ident: int = 7) -> probes.ProbeOutcome:
    return asyncio.run(probes.run(svc, (LOCALHOST, port), timeout, ident))


class HttpServer:
    """Answers every request with `status`; records what it was sent. `hang`: accepts and
    reads, never answers."""

    def __init__(self, status: int = 200, hang: bool = False, tls: ssl.SSLContext | None = None):
        self.status, self.hang, self.tls = status, hang, tls
        self.requests: list[bytes] = []
        self.port = 0

    async def __aenter__(self) -> HttpServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.hang:
                await asyncio.sleep(10)
            writer.write(f"HTTP/1.1 {self.status} Whatever\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


def http_probe(port: int, server: HttpServer | None = None, timeout: float = 2.0, **probe) -> probes.ProbeOutcome:
    svc = service(**probe)
    return asyncio.run(probes.run(svc, (LOCALHOST, port), timeout))


def with_server(server: HttpServer, svc: model.Service, timeout: float = 2.0) -> probes.ProbeOutcome:
    async def main():
        async with server:
            return await probes.run(svc, (LOCALHOST, server.port), timeout)
    return asyncio.run(main())


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- http -------------------------------------------------------------------------------

def test_http_200_passes_and_the_request_is_minimal_http_1_1():
    server = HttpServer(200)
    outcome = with_server(server, service(type="http", path="/healthz"))
    assert outcome.ok and outcome.detail == "HTTP 200 Whatever"
    (request,) = server.requests
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /healthz HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in lines and "Connection: close" in lines


def test_http_503_fails_as_an_answer_from_the_backend():
    outcome = with_server(HttpServer(503), service(type="http"))
    assert not outcome.ok and outcome.detail == "HTTP 503 Whatever"
    assert outcome.refused and not outcome.local  # the backend answered: the path works


def test_http_expected_status_list_and_default_range():
    assert with_server(HttpServer(302), service(type="http")).ok  # 200..399 by default
    assert not with_server(HttpServer(404), service(type="http")).ok
    assert with_server(HttpServer(404), service(type="http", expect_status=(404,))).ok
    assert not with_server(HttpServer(200), service(type="http", expect_status=(204,))).ok


def test_http_method_and_host_header():
    server = HttpServer(200)
    assert with_server(server, service(type="http", method="HEAD", host="example.com")).ok
    lines = server.requests[0].decode().split("\r\n")
    assert lines[0] == "HEAD / HTTP/1.1" and "Host: example.com" in lines


def test_http_backend_that_accepts_but_never_answers_times_out():
    started = time.monotonic()
    outcome = with_server(HttpServer(hang=True), service(type="http"), timeout=0.3)
    assert not outcome.ok and outcome.detail == "connected, no HTTP answer within 300 ms"
    assert outcome.refused  # the handshake completed: this host's path works
    assert 0.25 < time.monotonic() - started < 1.5


def test_http_refused_is_refused_and_not_local():
    outcome = run_probe(service(type="http"), closed_port())
    assert not outcome.ok and outcome.refused and not outcome.local and "ECONNREFUSED" in outcome.detail


def test_http_garbage_answer_fails():
    async def main():
        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH\r\n")
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            return await probes.run(service(type="http"), (LOCALHOST, server.sockets[0].getsockname()[1]), 2.0)
    outcome = asyncio.run(main())
    assert not outcome.ok and outcome.detail.startswith("not an HTTP answer")


def test_http_reads_a_bounded_status_line():
    async def main():
        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 " + b"x" * 100_000)
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            return await probes.run(service(type="http"), (LOCALHOST, server.sockets[0].getsockname()[1]), 2.0)
    outcome = asyncio.run(main())
    assert outcome.ok and len(outcome.detail) < probes.MAX_STATUS_LINE


# --- tls and https ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", d / "key.pem", "-out", d / "cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def server_tls(certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def test_https_with_the_ca_file_verifies_and_passes(certificate):
    server = HttpServer(200, tls=server_tls(certificate))
    outcome = with_server(server, service(type="https", ca_file=str(certificate[0])))
    assert outcome.ok and outcome.detail == "HTTP 200 Whatever"
    assert server.requests[0].startswith(b"GET / HTTP/1.1")


def test_https_untrusted_certificate_fails_unless_verify_is_off(certificate):
    outcome = with_server(HttpServer(200, tls=server_tls(certificate)), service(type="https"))
    assert not outcome.ok and outcome.refused and outcome.detail.startswith("certificate not trusted")
    assert with_server(HttpServer(200, tls=server_tls(certificate)), service(type="https", verify=False)).ok


def test_https_checks_the_server_name(certificate):
    wrong = service(type="https", ca_file=str(certificate[0]), server_name="other.example")
    outcome = with_server(HttpServer(200, tls=server_tls(certificate)), wrong)
    assert not outcome.ok and "certificate not trusted" in outcome.detail
    right = service(type="https", ca_file=str(certificate[0]), host="localhost:8443")
    assert with_server(HttpServer(200, tls=server_tls(certificate)), right).ok


def test_https_503_fails(certificate):
    outcome = with_server(HttpServer(503, tls=server_tls(certificate)), service(type="https", verify=False))
    assert not outcome.ok and outcome.detail == "HTTP 503 Whatever"


def test_tls_handshake_only(certificate):
    server = HttpServer(200, tls=server_tls(certificate))
    outcome = with_server(server, service(type="tls", ca_file=str(certificate[0])))
    assert outcome.ok and outcome.detail.startswith("TLS handshake (TLSv1.")
    assert server.requests == []


def test_tls_to_a_plain_server_fails():
    outcome = with_server(HttpServer(200), service(type="tls", verify=False), timeout=1.0)
    assert not outcome.ok and outcome.refused


def test_a_missing_ca_file_is_this_hosts_failure(tmp_path, certificate):
    outcome = with_server(HttpServer(200, tls=server_tls(certificate)),
                          service(type="tls", ca_file=str(tmp_path / "absent.pem")))
    assert not outcome.ok and outcome.local and outcome.detail.startswith("no TLS context")


# --- dns --------------------------------------------------------------------------------

def dns_answer(query: bytes, rcode: int) -> bytes:
    ident, flags = struct.unpack_from("!HH", query)
    return struct.pack("!HHHHHH", ident, 0x8000 | (flags & 0x0100) | rcode, 1, 0, 0, 0) + query[12:]


class DnsServer:
    """Answers every query over UDP and TCP on the same port with `rcode`; keeps the queries."""

    def __init__(self, rcode: int = 0):
        self.rcode, self.queries = rcode, []

    async def __aenter__(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        self.tcp = await asyncio.start_server(self._tcp, "127.0.0.1", 0)
        self.port = self.tcp.sockets[0].getsockname()[1]
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                server.queries.append(data)
                self.transport.sendto(dns_answer(data, server.rcode), addr)
        self.udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", self.port))
        return self

    async def __aexit__(self, *exc) -> None:
        self.tcp.close()
        self.udp.close()

    async def _tcp(self, reader, writer) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        query = await reader.readexactly(size)
        self.queries.append(query)
        answer = dns_answer(query, self.rcode)
        writer.write(len(answer).to_bytes(2, "big") + answer)
        await writer.drain()
        writer.close()


def with_dns(server: DnsServer, svc: model.Service, ident: int = 4242) -> probes.ProbeOutcome:
    async def main():
        async with server:
            return await probes.run(svc, (LOCALHOST, server.port), 2.0, ident)
    return asyncio.run(main())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dns_noerror_passes_and_asks_the_configured_question(transport):
    server = DnsServer(0)
    outcome = with_dns(server, service(type="dns", query_name="example.com", query_type="AAAA", transport=transport))
    assert outcome.ok and outcome.detail == "DNS reply for example.com AAAA"
    (query,) = server.queries
    assert struct.unpack_from("!H", query)[0] == 4242
    assert query[12:] == b"\x07example\x03com\x00" + struct.pack("!HH", 28, 1)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dns_unexpected_rcode_fails(transport):
    outcome = with_dns(DnsServer(2), service(type="dns", transport=transport))
    assert not outcome.ok and outcome.detail == "DNS SERVFAIL"
    assert with_dns(DnsServer(3), service(type="dns", transport=transport,
                                          expect_rcodes=("NOERROR", "NXDOMAIN"))).ok


def test_dns_over_udp_without_a_server_fails_with_the_icmp_error():
    outcome = run_probe(service(type="dns"), closed_port())
    assert not outcome.ok and outcome.refused


def test_udp_type_is_the_services_request(tmp_path):
    svc = model.Service("dns", "udp", ipaddress.ip_address("10.0.0.1"), 53, (model.Backend(LOCALHOST, 53),))
    server = DnsServer(5)  # REFUSED: the built-in DNS request passes anything but SERVFAIL
    outcome = with_dns(server, svc)
    assert outcome.ok and server.queries[0][12:] == b"\x00" + struct.pack("!HH", 2, 1)


# --- exec -------------------------------------------------------------------------------

def script(tmp_path, body: str) -> str:
    path = tmp_path / "check"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_exec_exit_0_passes_with_the_backend_in_its_environment(tmp_path):
    out = tmp_path / "env"
    command = (script(tmp_path, f'echo "$IPVSLB_SERVICE $IPVSLB_BACKEND_ADDRESS $IPVSLB_BACKEND_PORT $1" > {out}\n'),
               "arg")
    outcome = run_probe(service(type="exec", command=command), 8080)
    assert outcome.ok and outcome.detail == "exit 0"
    assert out.read_text() == "web 127.0.0.1 8080 arg\n"


def test_exec_failure_says_the_status_and_the_first_line_of_stderr(tmp_path):
    command = (script(tmp_path, "echo 'backend says no' >&2\nexit 3\n"),)
    outcome = run_probe(service(type="exec", command=command), 80)
    assert not outcome.ok and not outcome.local and outcome.detail == "exit 3: backend says no"


def test_exec_no_shell(tmp_path):
    marker = tmp_path / "marker"
    outcome = run_probe(service(type="exec", command=("/bin/echo", f"; touch {marker}")), 80)
    assert outcome.ok and not marker.exists()


def test_exec_timeout_kills_the_program_and_what_it_started(tmp_path):
    pidfile = tmp_path / "pid"
    command = (script(tmp_path, f"sleep 30 &\necho $! > {pidfile}\nwait\n"),)
    started = time.monotonic()
    outcome = run_probe(service(type="exec", command=command), 80, timeout=0.3)
    assert not outcome.ok and "still running after 300 ms, killed" in outcome.detail
    assert time.monotonic() - started < 2
    pid = int(pidfile.read_text())
    for _ in range(50):  # killed: gone, or a zombie until something reaps it
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.02)
    else:
        pytest.fail("the program's child survived the timeout")


def test_exec_that_cannot_start_is_this_hosts_failure(tmp_path):
    outcome = run_probe(service(type="exec", command=(str(tmp_path / "absent"),)), 80)
    assert not outcome.ok and outcome.local and "ENOENT" in outcome.detail


# --- the entry point and the bound ----------------------------------------------------------

def test_kind_and_timeout():
    assert probes.kind(service()) == "tcp" and probes.kind(service("udp")) == "udp"
    assert probes.kind(service("udp", type="dns")) == "dns"
    assert probes.timeout(service(), 0.2) == 0.2 and probes.timeout(service(type="http", timeout=3.0), 0.2) == 3.0


def test_run_tcp():
    outcome = run_probe(service(), closed_port())
    assert not outcome.ok and outcome.refused


def test_at_most_max_running_probes_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(probes, "MAX_RUNNING", 3)
    running = tmp_path / "running"
    running.mkdir()
    # Each program records itself while it runs: the most seen at once is the bound.
    command = (script(tmp_path, f'touch {running}/$$\nls {running} | wc -l >> {tmp_path}/seen\n'
                                f'sleep 0.2\nrm {running}/$$\n'),)
    svc = service(type="exec", command=command)

    async def main():
        return await asyncio.gather(*(probes.run(svc, (LOCALHOST, 80), 5.0) for _ in range(9)))
    outcomes = asyncio.run(main())
    assert all(o.ok for o in outcomes)
    seen = [int(n) for n in (tmp_path / "seen").read_text().split()]
    assert len(seen) == 9 and max(seen) == 3


def test_no_free_slot_within_the_timeout_is_this_hosts_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(probes, "MAX_RUNNING", 1)
    slow = service(type="exec", command=(script(tmp_path, "sleep 0.5\n"),))

    async def main():
        first = asyncio.create_task(probes.run(slow, (LOCALHOST, 80), 2.0))
        await asyncio.sleep(0.05)
        second = await probes.run(slow, (LOCALHOST, 80), 0.1)
        return await first, second
    first, second = asyncio.run(main())
    assert first.ok and not second.ok and second.local and second.detail.startswith("no free probe slot")


def test_probe_sockets_are_closed_whatever_the_outcome(certificate):
    """No file descriptor outlives a probe: answered, refused, timed out, TLS refused."""
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main():
        async with HttpServer(503) as bad, HttpServer(hang=True) as hung:
            await probes.run(service(type="http"), (LOCALHOST, bad.port), 1.0)  # warm up lazily made objects
            await probes.run(service(type="tls"), (LOCALHOST, bad.port), 1.0)
            await asyncio.sleep(0.05)
            before = fds()
            for _ in range(5):
                await probes.run(service(type="http"), (LOCALHOST, bad.port), 1.0)
                await probes.run(service(type="http"), (LOCALHOST, hung.port), 0.05)
                await probes.run(service(type="tls"), (LOCALHOST, bad.port), 1.0)
                await probes.run(service(type="http"), (LOCALHOST, closed_port()), 1.0)
                await probes.run(service(type="dns", transport="tcp"), (LOCALHOST, bad.port), 0.3)
            await asyncio.sleep(0.05)
            return before, fds()
    before, after = asyncio.run(main())
    assert after == before
