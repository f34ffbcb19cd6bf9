"""The executor of health's actions probes with the service's probe type (health.probe):
StartProbe against real servers on this host's loopback, the answer fed back to the engine."""
from __future__ import annotations

import asyncio
import ipaddress

from ipvslb import actions, health
from ipvslb.model import Backend, HealthSettings, ProbeSettings, Service

LOCALHOST = ipaddress.ip_address("127.0.0.1")


class Engine:
    def __init__(self, service: Service):
        self.service, self.fed = service, []

    def feed(self, evidence, now):
        self.fed.append(evidence)
        return []


class Nothing:
    def set_weight(self, *args):
        pass

    def rescue(self, *args):
        return []


class NoTcp:
    """The default TCP path must not be taken for other types."""
    def TcpProbe(self, *args):
        raise AssertionError("a TCP connect probe for a service with another probe type")

    async def probe(self, *args):
        raise AssertionError("a UDP probe for a service with another probe type")


def service(port: int, probe: ProbeSettings) -> Service:
    return Service("web", "tcp", ipaddress.ip_address("10.0.0.1"), 80, (Backend(LOCALHOST, port),),
                   health=HealthSettings(probe=probe))


def start_probe(probe: ProbeSettings, status: int, engine_timeout: float = 1.0, delay: float = 0.0):
    async def main():
        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(delay)
            writer.write(f"HTTP/1.1 {status} X\r\n\r\n".encode())
            try:
                await writer.drain()
            except ConnectionError:  # the probe gave up first
                pass
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            engine = Engine(service(server.sockets[0].getsockname()[1], probe))
            executor = actions.Executor(Nothing(), Nothing(), NoTcp(), clock=lambda: 5.0)
            executor.act(engine, [health.StartProbe(engine.service.backends[0].key, engine_timeout)])
            await asyncio.gather(*executor.probes)
            return engine.fed
    return asyncio.run(main())


def test_an_http_service_is_probed_with_its_request():
    (result,) = start_probe(ProbeSettings(type="http"), 503)
    assert isinstance(result, health.ProbeResult)
    assert not result.ok and result.detail == "HTTP 503 X" and result.refused and not result.local
    (result,) = start_probe(ProbeSettings(type="http"), 200)
    assert result.ok and result.detail == "HTTP 200 X"


def test_the_probes_own_timeout_replaces_the_engines():
    # The backend answers after 100 ms; the engine allows 20 ms, the probe 2 s.
    (result,) = start_probe(ProbeSettings(type="http"), 200, engine_timeout=0.02, delay=0.1)
    assert not result.ok and result.detail == "connected, no HTTP answer within 20 ms"
    (result,) = start_probe(ProbeSettings(type="http", timeout=2.0), 200, engine_timeout=0.02, delay=0.1)
    assert result.ok
