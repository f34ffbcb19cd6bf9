"""The daemon's background checks over the fake kernel: a backend whose HTTP server answers
503 is taken out by the checks (turned suspect, its HTTP probe fails) while its peer,
answering 200, stays; no checks of a service without active_interval."""
from __future__ import annotations

import asyncio

from ipvslb import health
from tests.unit.test_daemon_faults import make, place, started  # noqa: F401 (fixture)


async def http_server(host: str, status: int, seen: list):
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        seen.append(host)
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, host, 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_503_backend_is_quarantined_by_the_checks_and_its_peer_stays(place):  # noqa: F811
    async def main():
        seen: list = []
        bad, bad_port = await http_server("127.0.0.1", 503, seen)
        good, good_port = await http_server("127.0.0.2", 200, seen)
        quiet_seen: list = []
        quiet, quiet_port = await http_server("127.0.0.3", 200, quiet_seen)
        services = (f"  - {{name: web, vip: 10.90.0.1, port: 80, backends: [127.0.0.1:{bad_port}, "
                    f"127.0.0.2:{good_port}], health: {{active_interval: 0.1, probe: {{type: http}}}}}}\n"
                    f"  - {{name: quiet, vip: 10.90.0.2, port: 80, backends: [127.0.0.3:{quiet_port}], "
                    f"health: {{probe: {{type: http}}}}}}\n")
        d, kernel, tracer = make(place, services)
        started(d)
        d.active_checks.update(d.cfg.services)
        task = asyncio.create_task(d.active_checks.run())
        web = next(s for s in d.health.values() if s.service.name == "web")
        bad_key, good_key = (b.key for b in web.service.backends)
        for _ in range(100):
            if web.state(bad_key) is health.State.QUARANTINED:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.25)  # the peer's checks, a few rounds of them
        task.cancel()
        for s in (bad, good, quiet):
            s.close()
        return web.state(bad_key), web.state(good_key), web.weights(), bad_key, seen, quiet_seen
    bad_state, good_state, weights, bad_key, seen, quiet_seen = asyncio.run(main())
    assert bad_state is health.State.QUARANTINED and good_state is health.State.HEALTHY
    assert weights[bad_key] == 0
    assert "127.0.0.2" in seen and quiet_seen == []
