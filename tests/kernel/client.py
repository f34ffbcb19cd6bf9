"""The test client: `rate` connects per second to a VIP, each one timed and its outcome kept.

Used by the kernel tests, the benchmarks and the demo (testbed/demo.py).
"""
from __future__ import annotations

import concurrent.futures
import os
import select
import socket
import threading
import time
from dataclasses import dataclass

RATE = 50
CONNECT_TIMEOUT = 3.0


@dataclass
class Attempt:
    started: float
    ok: bool
    elapsed: float
    backend: str = ""
    error: str = ""  # "connect: ..." or "greeting: ...": which step failed
    client_port: int = 0  # to find the connect on the wire


class ClientLoop:
    """`rate` connects per second to the VIP, each in a worker so a stuck one does not block."""

    def __init__(self, vip: str, port: int, rate: int = RATE, timeout: float = CONNECT_TIMEOUT):
        self.target, self.rate, self.timeout = (vip, port), rate, timeout
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=int(4 * rate * timeout) + 8)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self) -> None:
        started = time.monotonic()
        family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        port, step = 0, "connect"
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                # Non-blocking, so the client port is known before the connect ends: a failed
                # connect gives its port back.
                s.setblocking(False)
                s.connect_ex(self.target)
                port = s.getsockname()[1]
                writable = select.poll()  # not select(): threads of a busy client hold fds past 1024
                writable.register(s, select.POLLOUT)
                if not writable.poll(self.timeout * 1000):
                    raise TimeoutError("timed out")
                if err := s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(err, os.strerror(err))
                step = "greeting"
                s.settimeout(self.timeout)
                name = s.makefile("rb").readline().strip().decode()
            self.attempts.append(Attempt(started, True, time.monotonic() - started, name, client_port=port))
        except OSError as err:
            self.attempts.append(Attempt(started, False, time.monotonic() - started,
                                         error=f"{step}: {err.strerror or err}", client_port=port))

    def _run(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._one)
            tick += 1.0 / self.rate
            time.sleep(max(0.0, tick - time.monotonic()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop starting connects and wait for those under way. Safe to call more than once,
        and before start (a caller's cleanup after a failed set-up)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)
