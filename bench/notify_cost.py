#!/usr/bin/env python3
"""Benchmark (not a test): what notify hooks cost the daemon's event loop.

Runs anywhere (no IPVS or BPF needed):
    .venv/bin/python bench/notify_cost.py

A ticker on the loop asks to wake every 10 ms for RUN seconds; meanwhile HOOKS transitions
are handed to a Notifier (ipvslb/notify.py) 5 ms apart, each hook `/bin/sh -c 'sleep 0.5'`.
The table gives, per case, the longest `transition()` call and how late the ticker woke
(p50, p99, max): the cost of the hooks to health decisions, which share that loop. The
first and last rows run no hook (the machine's own noise); the "blocking" row waits for each
hook on the loop, as a synchronous implementation would.
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipvslb.notify import Notifier, TransitionNote  # noqa: E402

RUN = 1.5
ARGV = ("/bin/sh", "-c", "sleep 0.5")
CASES = [("no hooks", 4, 0, False), ("8 hooks, 4 at once", 4, 8, False), ("64 hooks, 16 at once", 16, 64, False),
         ("64 hooks, 4 at once", 4, 64, False), ("no hooks", 4, 0, False), ("1 hook, blocking", 1, 1, True)]


async def case(limit: int, hooks: int, blocking: bool) -> tuple[float, list[float]]:
    notifier = Notifier(ARGV, timeout=5, limit=limit)
    late: list[float] = []
    calls: list[float] = [0.0]

    async def ticker() -> None:
        end = time.monotonic() + RUN
        while time.monotonic() < end:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            late.append(time.monotonic() - before - 0.01)

    tick = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.05)
    for i in range(hooks):
        before = time.monotonic()
        if blocking:
            subprocess.run(ARGV, check=False)
        else:
            notifier.transition(TransitionNote("api", f"10.0.1.{i % 250}:80", "healthy", "quarantined", "bench"))
        calls.append(time.monotonic() - before)
        await asyncio.sleep(0.005)
    await tick
    await notifier.close()
    return max(calls), sorted(late)


def main() -> None:
    logging.disable(logging.WARNING)  # close() drops the waiting notes, with a warning
    print(f"{'case':<22} {'transition() max':>17} {'late p50':>9} {'late p99':>9} {'late max':>9}")
    for name, limit, hooks, blocking in CASES:
        call, late = asyncio.run(case(limit, hooks, blocking))
        p50, p99 = late[len(late) // 2], late[int(len(late) * 0.99)]
        print(f"{name:<22} {call * 1e6:>14.0f} us {p50 * 1e3:>6.2f} ms {p99 * 1e3:>6.2f} ms {late[-1] * 1e3:>6.2f} ms")


if __name__ == "__main__":
    main()
