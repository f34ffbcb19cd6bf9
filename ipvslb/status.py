"""The status socket: a root-only unix socket that answers every connection with one JSON
document describing services and backends, and the `ipvslb status` table made from it."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path


async def serve(path: str, snapshot: Callable[[], dict]) -> asyncio.AbstractServer:
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    if sock_path.exists() or sock_path.is_symlink():
        sock_path.unlink()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(snapshot(), default=str).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    # umask rather than chmod after bind: no window in which others could connect.
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(answer, path=str(sock_path))
    finally:
        os.umask(old)


def fetch(path: str, timeout: float = 5.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, now - ts)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(doc: dict) -> str:
    """The human table: one block per service, one row per backend."""
    now = doc.get("now", time.monotonic())
    lines = [f"ipvslb {doc.get('version', '?')} pid {doc.get('pid', '?')}, attribution: "
             f"{doc.get('attribution', '?')}, lost tracer records: {doc.get('lost_records', 0)}, "
             f"skipped tracer runs: {doc.get('missed_runs', 0)}, "
             f"connects counted without records: {doc.get('counted_successes', 0)}"]
    header = ("BACKEND", "STATE", "WEIGHT", "SINCE", "OK", "HARD", "SOFT", "QUAR", "LAST EVIDENCE")
    for svc in doc.get("services", []):
        freeze = "  [FROZEN: correlated failures]" if svc.get("frozen") else ""
        lines.append("")
        lines.append(f"{svc['name']}  {svc['protocol']} {svc['vip']}{freeze}")
        rows = [header]
        for b in svc.get("backends", []):
            c = b.get("counters", {})
            rows.append((b["endpoint"], b["state"], f"{b['weight']}/{b['configured_weight']}",
                         _ago(b.get("since"), now), str(c.get("successes", 0)), str(c.get("hard_failures", 0)),
                         str(c.get("soft_failures", 0)), str(c.get("quarantines", 0)),
                         b.get("last_evidence") or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        for r in rows:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)
