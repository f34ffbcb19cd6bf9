#!/usr/bin/env python3
"""What each probe type costs on this host's loopback, and whether probes hold up the event
loop: N probes of a type started at once against local servers, their median and p99
duration, and the event loop's worst lag meanwhile (a 1 ms ticker's longest gap beyond 1 ms).

    .venv/bin/python bench/probe_cost.py [--count 200]

Prints one table row per type. Needs the openssl command for https/tls.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import multiprocessing
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipvslb import model, probes  # noqa: E402

LOCALHOST = ipaddress.ip_address("127.0.0.1")


def service(**probe) -> model.Service:
    return model.Service("bench", "tcp", ipaddress.ip_address("10.0.0.1"), 80, (model.Backend(LOCALHOST, 80),),
                         health=model.HealthSettings(probe=model.ProbeSettings(**probe)))


async def http(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def dns(reader, writer):
    try:
        size = int.from_bytes(await reader.readexactly(2), "big")
        query = await reader.readexactly(size)
        answer = query[:2] + bytes([0x81, 0x80]) + query[4:]
        writer.write(len(answer).to_bytes(2, "big") + answer)
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def lag_while(work) -> tuple[object, float]:
    """Run `work` with a 1 ms ticker beside it; the ticker's worst lateness."""
    worst = 0.0
    done = False

    async def ticker():
        nonlocal worst
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    result = await work
    done = True
    await tick
    return result, worst


async def measure(name: str, svc: model.Service, port: int, count: int) -> tuple:
    await probes.run(svc, (LOCALHOST, port), 5.0)  # warm up (TLS context, imports)
    started = time.perf_counter()
    outcomes, lag = await lag_while(asyncio.gather(*(probes.run(svc, (LOCALHOST, port), 10.0)
                                                     for _ in range(count))))
    wall = time.perf_counter() - started
    times = sorted(o.elapsed for o in outcomes)
    ok = sum(o.ok for o in outcomes)
    return (name, count, ok, statistics.median(times) * 1000, times[int(0.99 * (len(times) - 1))] * 1000,
            wall * 1000, lag * 1000)


def servers(cert: Path | None, ports: multiprocessing.Queue) -> None:
    """The servers, in a process of their own: their work is not the probes' loop lag."""
    async def run():
        plain = await asyncio.start_server(http, "127.0.0.1", 0, backlog=1024)
        dns_server = await asyncio.start_server(dns, "127.0.0.1", 0, backlog=1024)
        tls_port = 0
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert / "c.pem", cert / "k.pem")
            tls = await asyncio.start_server(http, "127.0.0.1", 0, ssl=context, backlog=1024)
            tls_port = tls.sockets[0].getsockname()[1]
        ports.put((plain.sockets[0].getsockname()[1], dns_server.sockets[0].getsockname()[1], tls_port))
        await asyncio.Event().wait()
    asyncio.run(run())


async def main(count: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    cert = None
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", tmp / "k.pem", "-out", tmp / "c.pem", "-days", "1", "-subj", "/CN=x",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        cert = tmp
    queue: multiprocessing.Queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=servers, args=(cert, queue), daemon=True)
    child.start()
    port, dns_port, tls_port = queue.get(timeout=30)
    rows = []
    rows.append(await measure("tcp", service(type="tcp"), port, count))
    rows.append(await measure("http", service(type="http"), port, count))
    rows.append(await measure("dns (tcp)", service(type="dns", transport="tcp"), dns_port, count))
    if cert is not None:
        rows.append(await measure("https", service(type="https", ca_file=str(tmp / "c.pem")), tls_port, count))
        rows.append(await measure("tls", service(type="tls", ca_file=str(tmp / "c.pem")), tls_port, count))
    rows.append(await measure("exec /bin/true", service(type="exec", command=("/bin/true",)), port,
                              min(count, 100)))
    child.terminate()
    print(f"{'type':<16}{'probes':>7}{'ok':>6}{'median ms':>11}{'p99 ms':>9}{'all, ms':>9}{'loop lag ms':>13}")
    for name, n, ok, median, p99, wall, lag in rows:
        print(f"{name:<16}{n:>7}{ok:>6}{median:>11.2f}{p99:>9.2f}{wall:>9.0f}{lag:>13.2f}")
    print(f"(at most {probes.MAX_RUNNING} probes other than tcp at once; 'all': the wall time for all of them)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="probes per type, started at once")
    asyncio.run(main(parser.parse_args().count))
