"""The UDP probe: a real request (a DNS query on port 53, the configured payload elsewhere)
that needs an answer, against servers on this machine's loopback."""
import asyncio
import ipaddress
import socket
import struct
import threading

import pytest

from ipvslb import udprequest
from ipvslb.model import Backend, HealthSettings, Service
from ipvslb.probe import probe_udp

LOCAL = ipaddress.ip_address("127.0.0.1")


def service(port: int, **health) -> Service:
    return Service("s", "udp", ipaddress.ip_address("10.0.0.1"), port, (Backend(LOCAL, port),),
                   health=HealthSettings(**health))


def test_the_dns_query_is_a_header_and_one_ns_question():
    query = udprequest.dns_query("example.com", 0x1234)
    assert query == (bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\x07example\x03com\x00"
                     + bytes.fromhex("0002 0001"))
    assert udprequest.dns_query(".", 7)[12:] == b"\x00" + bytes.fromhex("0002 0001")
    assert udprequest.dns_query("example.com.", 1) == udprequest.dns_query("example.com", 1)


def reply(ident: int, rcode: int = 0, qr: bool = True) -> bytes:
    return struct.pack("!HHHHHH", ident, (0x8000 if qr else 0) | 0x0100 | rcode, 1, 0, 0, 0)


def test_a_dns_reply_to_the_query_passes_unless_it_is_servfail():
    assert udprequest.dns_verdict(5, reply(5)) is None
    assert udprequest.dns_verdict(5, reply(5, rcode=3)) is None  # NXDOMAIN: the server answered
    assert udprequest.dns_verdict(5, reply(5, rcode=5)) is None  # REFUSED: a zone it does not serve
    assert udprequest.dns_verdict(5, reply(5, rcode=2)) == "DNS SERVFAIL"
    assert udprequest.dns_verdict(5, reply(6)) == "not a reply to the probe's DNS query"
    assert udprequest.dns_verdict(5, reply(5, qr=False)) == "not a reply to the probe's DNS query"
    assert udprequest.dns_verdict(5, b"\x00\x05") == "not a DNS reply (2 bytes)"


def test_port_53_gets_a_dns_query_for_the_configured_name_and_other_ports_the_payload():
    dns = udprequest.for_service(service(53, dns_probe_name="example.org"), 99)
    assert dns.payload == udprequest.dns_query("example.org", 99) and "example.org" in dns.what
    assert dns.judge(reply(99)) is None and dns.judge(reply(98)) is not None
    plain = udprequest.for_service(service(5000), 99)
    assert plain.payload == udprequest.DEFAULT_PAYLOAD and plain.judge(b"anything") is None
    custom = udprequest.for_service(service(5000, udp_probe_payload="\x01ping", udp_probe_expect="pong\xff"), 1)
    assert custom.payload == b"\x01ping"
    assert custom.judge(b"..pong\xff..") is None and "expected" in custom.judge(b"pong")
    # A payload configured on port 53 is sent instead of the DNS query.
    assert udprequest.for_service(service(53, udp_probe_payload="hi"), 1).payload == b"hi"


class Server:
    """A UDP server on loopback answering each datagram with answer(datagram), or nothing
    when that is None."""

    def __init__(self, answer):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            out = self.answer(data)
            if out is not None:
                self.sock.sendto(out, peer)

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    made = []

    def make(answer):
        made.append(Server(answer))
        return made[-1]
    yield make
    for s in made:
        s.close()


def run_probe(port: int, request, timeout: float = 0.5):
    return asyncio.run(probe_udp(LOCAL, port, timeout, request))


def test_a_dns_server_that_answers_passes_and_silence_fails(server):
    dns = server(lambda q: q[:2] + bytes([0x81, 0x80]) + q[4:])  # the query back, as a reply
    request = udprequest.UdpRequest(udprequest.dns_query(".", 4242), lambda r: udprequest.dns_verdict(4242, r),
                                    "DNS reply")
    outcome = run_probe(dns.port, request)
    assert outcome.ok and outcome.detail == "DNS reply"
    silent = server(lambda q: None)
    outcome = run_probe(silent.port, request, timeout=0.2)
    assert not outcome.ok and outcome.detail == "no reply within 200 ms"


def test_a_reply_without_the_expected_bytes_fails_and_one_with_them_passes(server):
    echo = server(lambda q: b"echo " + q)
    expecting = udprequest.for_service(service(5000, udp_probe_payload="ping", udp_probe_expect="echo ping"), 1)
    assert run_probe(echo.port, expecting).ok
    wrong = udprequest.for_service(service(5000, udp_probe_payload="ping", udp_probe_expect="pong"), 1)
    outcome = run_probe(echo.port, wrong)
    assert not outcome.ok and "pong" in outcome.detail


def test_a_closed_port_fails_at_once_with_the_icmp_error():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now: the kernel answers with ICMP port unreachable
    outcome = run_probe(port, udprequest.for_service(service(5000), 1), timeout=2.0)
    assert not outcome.ok and "ECONNREFUSED" in outcome.detail and outcome.refused
    assert outcome.elapsed < 1.0


def load(tmp_path, health: str):
    from ipvslb import config
    path = tmp_path / "c.yaml"
    path.write_text("services:\n  - {name: dns, protocol: udp, vip: 10.0.0.1, port: 53, backends: [10.1.0.1],\n"
                    f"     health: {health}}}\n")
    return config.load(str(path))


def test_the_probe_settings_are_read_and_checked_with_clear_errors(tmp_path):
    from ipvslb import config
    cfg = load(tmp_path, '{dns_probe_name: example.com., udp_probe_payload: "\\x00\\xffhi", udp_probe_expect: ok}')
    h = cfg.services[0].health
    assert (h.dns_probe_name, h.udp_probe_payload, h.udp_probe_expect) == ("example.com.", "\x00\xffhi", "ok")
    assert load(tmp_path, "{}").services[0].health.dns_probe_name == "."
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, "{dns_probe_name: 'bad name', udp_probe_payload: '', udp_probe_expect: \"\\u20ac\"}")
    text = "\n".join(err.value.messages)
    assert "health.dns_probe_name: not a DNS name: got 'bad name'" in text
    assert "health.udp_probe_payload: empty" in text
    assert "health.udp_probe_expect: a character beyond \\xff" in text
