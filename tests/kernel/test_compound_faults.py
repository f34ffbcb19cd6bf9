"""Faults that come one after another, or all at once, against the daemon with its default
guards (issue 17): a second backend failing while the first is still out, three of four
failing in turn, this host losing its path to every backend, and a backend so far away
that its connects see SYN retransmits although none fails.

The daemon runs with its defaults except a short slow start and probation, so that the
tests need not wait 40 s for each re-admitted backend to leave probation: the guards and
the detection measured here do not depend on either.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.kernel import topology
from tests.kernel.client import ClientLoop
from tests.kernel.daemonproc import WORK, first_weight, running, wait_for
from tests.kernel.daemonproc import kernel_weights as weights_of  # of a given VIP
from tests.kernel.wire import SynWatch

THREE = ("10.91.0.3", 80)  # a service over backends b4 b5 b6
FOUR = ("10.91.0.4", 80)   # a service over backends b4 b5 b6 b7
WEIGHT = 10
RATE, TIMEOUT = 50, 3.0


def write_config(three, four) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    lines = [
        "settings:",
        f"  state_dir: {WORK}/state",
        f"  status_socket: {WORK}/status.sock",
        "  metrics_address: 127.0.0.1:9743",
        "  log_level: debug",
        "services:",
    ]
    for name, (vip, port), backends in (("three", THREE, three), ("four", FOUR, four)):
        lines += [
            f"  - name: {name}",
            f"    vip: {vip}",
            f"    port: {port}",
            "    scheduler: rr",
            "    health: {slow_start: 2, probation: 5}",
            "    backends:",
            *[f"      - {{address: {b.v4}, port: {b.port}, weight: {WEIGHT}}}" for b in backends],
        ]
    path = WORK / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def endpoint(b) -> str:
    return f"{b.v4}:{b.port}"


@pytest.fixture(scope="module")
def four_backends(ipvs):
    topo = topology.build(4, prefix="c", first=4)
    yield topo
    topo.teardown()


@pytest.fixture(scope="module")
def daemon(four_backends):
    with running(write_config(four_backends.backends[:3], four_backends.backends)) as d:
        yield d


def rows(daemon, service: str) -> dict[str, dict]:
    return {b["endpoint"]: b for s in daemon.status()["services"] if s["name"] == service for b in s["backends"]}


@pytest.fixture
def fresh(daemon, four_backends):
    four_backends.reset()
    for b in four_backends.backends:
        subprocess.run(["ip", "link", "set", b.host_link, "up"], check=True)
    wait_for(lambda: all(r["state"] == "healthy" and r["weight"] == r["configured_weight"]
                         and r["probation_until"] is None
                         for s in ("three", "four") for r in rows(daemon, s).values()),
             90, "every backend healthy, out of probation")
    return daemon


@pytest.fixture
def client():
    started: list[ClientLoop] = []

    def start(vip: tuple[str, int]) -> ClientLoop:
        loop = ClientLoop(*vip, rate=RATE, timeout=TIMEOUT)
        loop.start()
        started.append(loop)
        return loop

    yield start
    for loop in started:
        loop.stop()


def wait_for_history(loop: ClientLoop, backends) -> None:
    """Twenty connects to each backend: its adaptive connect deadline is trusted."""
    names = {f"b{b.index}" for b in backends}
    wait_for(lambda: all(sum(1 for a in loop.attempts if a.ok and a.backend == n) >= 20 for n in names), 30,
             "a connect history on every backend")


def failures(loop: ClientLoop, since: float) -> list[str]:
    return [f"{a.started - since:+.2f} s: {a.error}" for a in loop.attempts if not a.ok and a.started >= since]


def fail(b, mode: str, daemon, service: str) -> float:
    """Put `b` in `mode` and return when its weight 0 was written (the daemon's history)."""
    fault = time.monotonic()
    b.set_mode(mode)
    row = wait_for(lambda: (r := rows(daemon, service)[endpoint(b)]) and r["weight"] == 0 and r, 10,
                   f"{endpoint(b)} at weight 0 after it started to {mode}")
    return first_weight(row, lambda w: w == 0, fault) - fault


def test_a_second_backend_blackholed_while_a_refusing_one_is_out_is_also_out(client, fresh, four_backends):
    """3 backends: one refuses, then a second is blackholed while the first is still out.
    Both end at weight 0; at most 2 connects fail in all (the refusal's first RSTs)."""
    a, b, c = four_backends.backends[:3]
    loop = client(THREE)
    wait_for_history(loop, (a, b, c))
    start = time.monotonic()
    refused_out = fail(a, "refuse", fresh, "three")
    time.sleep(2)
    with SynWatch(b.host_link, str(b.v4), b.port) as syns:
        fault = time.monotonic()
        blackholed_out = fail(b, "blackhole", fresh, "three")
        time.sleep(4)  # every connect started before the quarantine has finished or timed out
    loop.stop()
    first_syn = syns.first_unanswered_after(fault)
    failed = failures(loop, start)
    print(f"refused: weight 0 after {refused_out * 1000:.0f} ms; blackholed: weight 0 after "
          f"{blackholed_out * 1000:.0f} ms ({(fault + blackholed_out - first_syn) * 1000:.0f} ms after the first "
          f"SYN it swallowed); {len(failed)} of {len(loop.attempts)} connects failed: {failed}")
    assert weights_of(*THREE) == {endpoint(a): 0, endpoint(b): 0, endpoint(c): WEIGHT}
    assert len(failed) <= 2, "\n".join(failed + [fresh.log()[-3000:]])


def test_three_of_four_backends_failing_in_turn_are_all_out(client, fresh, four_backends):
    """4 backends: a refusal, a blackhole and a refusal, 2 s apart, each while the others are
    out. All three end at weight 0, the fourth serves; at most 3 connects fail in all."""
    backends = four_backends.backends
    loop = client(FOUR)
    wait_for_history(loop, backends)
    start = time.monotonic()
    times = []
    for b, mode in zip(backends[:3], ("refuse", "blackhole", "refuse"), strict=True):
        times.append(f"{endpoint(b)} {mode}: out after {fail(b, mode, fresh, 'four') * 1000:.0f} ms")
        time.sleep(2)
    time.sleep(2)
    loop.stop()
    failed = failures(loop, start)
    print("; ".join(times) + f"; {len(failed)} of {len(loop.attempts)} connects failed: {failed}")
    assert weights_of(*FOUR) == {**{endpoint(b): 0 for b in backends[:3]}, endpoint(backends[3]): WEIGHT}
    assert len(failed) <= 3, "\n".join(failed + [fresh.log()[-3000:]])


def batch(tool: str, lines: list[str]) -> None:
    """Run `lines` through one `ip -batch` or `tc -batch`: the paths change within a
    millisecond of each other, as when this host's one link or one rule goes (one `ip` call
    per backend would spread them over 100-200 ms under emulation)."""
    result = subprocess.run([tool, "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def lose_every_path(backends, how: str) -> None:
    if how == "link down":
        for b in backends:
            # Keep the addresses: without this the kernel drops the link's IPv6 addresses.
            topology.sysctl(f"net.ipv6.conf.{b.host_link}.keep_addr_on_down", 1)
        batch("ip", [f"link set {b.host_link} down" for b in backends])
    else:  # every frame this host sends to the backends is dropped on its way out
        batch("tc", [f"qdisc replace dev {b.host_link} root netem loss 100%" for b in backends])


def restore_every_path(backends, how: str) -> None:
    if how == "link down":
        batch("ip", [f"link set {b.host_link} up" for b in backends])
    else:
        batch("tc", [f"qdisc del dev {b.host_link} root" for b in backends])


@pytest.mark.parametrize("how", ["link down", "drop on the way out"])
def test_this_host_losing_its_path_to_every_backend_quarantines_nothing_while_it_is_lost(
        how, client, fresh, four_backends):
    """Every backend of the service unreachable from this host at once, for 5 s: that is this
    host's failure, not the backends'. Nothing is quarantined while the path is lost; once it
    is back every backend serves again at full weight without a restart, and no connect
    started after the restore fails.

    A link set up again transmits only once the kernel has activated it (its link watch, up
    to 1 s later; a SYN sent meanwhile is dropped without an error): a backend whose connect
    and probe fall in that gap can be quarantined right after the restore and re-admitted by
    its probes a few seconds later (seen on 6.12: 2 of 3 backends out 0.2 s after the
    restore, at full weight again 4.3 s later, no failed connect). That is not asserted
    against; the daemon cannot tell it from two backends failing together."""
    backends = four_backends.backends[:3]
    full = {endpoint(b): WEIGHT for b in backends}
    loop = client(THREE)
    wait_for_history(loop, backends)
    # Every backend judged by a short deadline, as the scenario means: connects an earlier
    # test slowed (1-5 s) can hold a backend's p99, and its deadline, up for 200 connects.
    # A backend whose deadline is seconds long is not silent "together" with the others.
    wait_for(lambda: all(r["connect_deadline"] is not None and r["connect_deadline"] <= 0.5
                         for r in rows(fresh, "three").values()),
             60, "every backend's connect deadline trusted and at most 0.5 s")
    pid = fresh.proc.pid
    lost = time.monotonic()
    lose_every_path(backends, how)
    try:
        time.sleep(5)
    finally:
        restore_every_path(backends, how)
    restored = time.monotonic()
    wait_for(lambda: all(x["state"] == "healthy" for x in rows(fresh, "three").values())
             and weights_of(*THREE) == full, 30, "every backend healthy at full weight again")
    back = time.monotonic()
    time.sleep(3)
    loop.stop()
    row = rows(fresh, "three")
    lowered = {ep: [(round(t - lost, 2), w) for t, w in r["weight_history"] if lost <= t <= restored and w < WEIGHT]
               for ep, r in row.items()}
    after_restore = [a for a in loop.attempts if a.started >= restored]
    after = [a for a in after_restore if a.started >= back]
    print(f"{how}: every path lost for {restored - lost:.1f} s; healthy at full weight {back - restored:.2f} s after "
          f"it came back; weights lowered while lost: {lowered}; connects after the restore: {len(after_restore)}, "
          f"{sum(1 for a in after_restore if not a.ok)} failed; freeze lines: "
          f"{[line for line in fresh.log().splitlines() if 'freez' in line or 'frozen' in line][-3:]}")
    assert all(not changes for changes in lowered.values()), lowered
    # Full weight again, also after a re-admission that the link's activation gap caused
    # (see above): waited for, not read once.
    wait_for(lambda: weights_of(*THREE) == full, 30, "every backend at full weight after the restore")
    assert fresh.proc.pid == pid and fresh.proc.poll() is None
    assert after and all(a.ok for a in after_restore), [a.error for a in after_restore if not a.ok]
    assert {a.backend for a in after} == {f"b{b.index}" for b in backends}


FAR_MS = 1500  # a round trip well above the 1 s of the first SYN retransmit


def test_a_backend_1500ms_away_is_never_out_while_a_blackhole_beside_it_is_caught_as_fast(client, fresh, four_backends):
    """One backend always far away (it joins the service with the delay already there): its
    connects all see a SYN retransmit before their SYN-ACK, none fails. Under load for 30 s it
    is never taken out, no connect fails, and a blackholed backend beside it is out within
    500 ms of the first SYN it swallowed, as without the far one."""
    far, near, other = four_backends.backends[:3]
    write_config([near, other], four_backends.backends)
    fresh.proc.send_signal(1)
    wait_for(lambda: endpoint(far) not in weights_of(*THREE), 10, "the far backend out of the service")
    far.set_delay(FAR_MS)
    write_config([far, near, other], four_backends.backends)
    fresh.proc.send_signal(1)
    wait_for(lambda: endpoint(far) in weights_of(*THREE), 10, "the far backend in the service")
    try:
        joined = time.monotonic()
        loop = client(THREE)
        time.sleep(30)
        far_row = rows(fresh, "three")[endpoint(far)]
        wait_for_history(loop, (near, other))
        with SynWatch(other.host_link, str(other.v4), other.port) as syns:
            fault = time.monotonic()
            out = fail(other, "blackhole", fresh, "three")
            time.sleep(4)
        loop.stop()
        far_row = rows(fresh, "three")[endpoint(far)]
    finally:
        far.set_delay(0)
    first_syn = syns.first_unanswered_after(fault)
    to_far = [a for a in loop.attempts if a.backend == f"b{far.index}"]
    times = sorted(a.elapsed for a in to_far)
    failed = failures(loop, joined)
    print(f"{FAR_MS} ms away: {len(to_far)} connects to it, median {times[len(times) // 2]:.2f} s; its state "
          f"{far_row['state']}, weights {[w for t, w in far_row['weight_history'] if t >= joined]}; "
          f"{fresh.log().count('suspect')} suspect lines in the log. Blackhole beside it: weight 0 "
          f"{(fault + out - first_syn) * 1000:.0f} ms after its first swallowed SYN; {len(failed)} failed: {failed}")
    assert to_far and times[len(times) // 2] > 1.0, "the far backend was not far"
    assert all(w == WEIGHT for t, w in far_row["weight_history"] if t >= joined), far_row["weight_history"]
    assert far_row["state"] in ("healthy", "suspect")
    assert fault + out - first_syn < 0.5
    assert failed == [], "\n".join(failed + [fresh.log()[-3000:]])
    other.set_mode("accept")
