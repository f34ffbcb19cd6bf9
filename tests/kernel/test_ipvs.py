"""ipvslb.ipvs against the real kernel: `ipvsadm` and `ip` serve only as independent
oracles (and to play the administrator who adds a service by hand)."""
from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvslb.ipvs import IPVS, Manager, Op, OpKind, ServiceSpec, sysctls
from ipvslb.ipvs.specs import DestSpec, service_spec
from ipvslb.model import Backend, Service, Settings
from tests.kernel import ipvs_configs as cfg
from tests.kernel.conftest import connect, ipvsadm, udp_ask
from tests.kernel.topology import sh

VIP_LINK = "ipvslbt0"
REPO = Path(__file__).resolve().parents[2]


def listing() -> dict:
    return cfg.parse_listing(ipvsadm("-Ln"))


def vips_on_link() -> set[str]:
    # The kernel gives the dummy an IPv6 link-local address of its own: not a VIP.
    out = sh("ip", "-o", "addr", "show", "dev", VIP_LINK, "scope", "global", check=False).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


@pytest.fixture
def settings(tmp_path):
    return Settings(vip_interface=VIP_LINK, state_dir=str(tmp_path / "state"))


@pytest.fixture
def manager(topo, settings):
    sh("ip", "link", "del", VIP_LINK, check=False)
    m = Manager(settings)
    yield m
    m.close()
    sh("ip", "link", "del", VIP_LINK, check=False)


def hand_add_service() -> None:
    ipvsadm("-A", "-t", cfg.HAND_MADE, "-s", "lc")
    ipvsadm("-a", "-t", cfg.HAND_MADE, "-r", "10.77.2.2:8080", "-m", "-w", "7")


HAND_MADE_LISTING = ("lc", {"10.77.2.2:8080": ("Masq", 7)})


def test_config_a_matches_ipvsadm_exactly(manager):
    manager.apply(cfg.config_a())
    assert listing() == cfg.LISTING_A
    assert vips_on_link() == {"10.90.0.1", "10.90.0.2", "fd90::1", "10.90.0.4"}


def test_config_b_matches_and_a_long_lived_stream_through_a_kept_backend_survives(manager):
    manager.apply(cfg.config_a())
    # wlc spreads two held connections over b1 and b2; b1 stays in B, b2 leaves.
    streams = dict(connect(str(cfg.WEB), 80)[:2] for _ in range(2))
    assert set(streams) == {"b1", "b2"}
    kept = streams["b1"]
    kept.sendall(b"before\n")
    assert kept.recv(64) == b"before\n"

    result = manager.apply(cfg.config_b())
    assert listing() == cfg.LISTING_B
    # web: scheduler, b1's weight, b3 in, b2 out; direct: two forwarding methods; web6 out; dns6 in
    assert collections.Counter(op.kind.value for op in result.ops) == {
        "edit-service": 1, "edit-dest": 3, "add-dest": 4, "delete-dest": 1, "delete-service": 1, "add-service": 1}

    kept.sendall(b"after\n")
    assert kept.recv(64) == b"after\n"
    kept.close()
    streams["b2"].close()
    seen = {connect(str(cfg.WEB), 80)[0] for _ in range(8)}
    assert seen == {"b1", "b3"}
    assert vips_on_link() == {"10.90.0.1", "10.90.0.2", "10.90.0.4", "fd90::2"}


def test_same_config_twice_makes_no_writes(manager):
    first = manager.apply(cfg.config_a())
    assert first.writes > 0
    before = manager.writes
    second = manager.apply(cfg.config_a())
    assert (second.writes, second.ops, manager.writes - before) == (0, [], 0)
    manager.apply(cfg.config_b())
    assert manager.apply(cfg.config_b()).writes == 0


def test_changes_made_by_others_are_repaired_at_the_next_verify(topo, settings):
    """An apply trusts its snapshot of what it wrote; the verify, when it comes (asked
    for, or the snapshot older than ipvs_verify_interval), reads the kernel and repairs."""
    sh("ip", "link", "del", VIP_LINK, check=False)
    m = Manager(dataclasses.replace(settings, ipvs_verify_interval=2.0))
    try:
        m.apply(cfg.config_a())
        ipvsadm("-d", "-t", "10.90.0.1:80", "-r", "10.77.1.2:8080")
        ipvsadm("-e", "-u", "10.90.0.2:53", "-r", "10.77.3.2:8080", "-m", "-w", "9")
        ipvsadm("-E", "-t", "10.90.0.4:443", "-s", "lc")
        drifted = listing()
        assert drifted != cfg.LISTING_A
        assert m.apply(cfg.config_a()).writes == 0     # the snapshot is fresh: no read at all
        assert listing() == drifted
        repaired = m.apply(cfg.config_a(), verify=True)
        assert collections.Counter(op.kind.value for op in repaired.ops) == {"add-dest": 1, "edit-dest": 1,
                                                                          "edit-service": 1}
        assert listing() == cfg.LISTING_A

        ipvsadm("-d", "-u", "10.90.0.2:53", "-r", "10.77.1.2:8080")
        time.sleep(2.1)
        assert [op.kind.value for op in m.apply(cfg.config_a()).ops] == ["add-dest"]   # stale: verified
        assert listing() == cfg.LISTING_A
    finally:
        m.close()
        sh("ip", "link", "del", VIP_LINK, check=False)


def test_hand_added_service_survives_every_apply_and_restarts(manager, settings):
    hand_add_service()
    for config in (cfg.config_a, cfg.config_b, cfg.config_a):
        manager.apply(config())
        assert listing()[f"TCP {cfg.HAND_MADE}"] == HAND_MADE_LISTING
    owned = json.loads((Path(settings.state_dir) / "owned.json").read_text())
    assert ["tcp", "10.99.0.1", 80] not in owned["services"]

    # A restart in this process: a new manager, ownership from owned.json.
    manager.close()
    restarted = Manager(settings)
    restarted.apply(cfg.config_b())
    assert listing() == {**cfg.LISTING_B, f"TCP {cfg.HAND_MADE}": HAND_MADE_LISTING}

    # A restart as a new process, which then removes everything it owns.
    code = ("import sys; from ipvslb.ipvs import Manager; from ipvslb.model import Settings; "
            f"m = Manager(Settings(vip_interface={VIP_LINK!r}, state_dir=sys.argv[1])); "
            "r = m.apply([]); print(len(r.ops))")
    done = subprocess.run([sys.executable, "-c", code, settings.state_dir], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert int(out) == len(cfg.LISTING_B)
    assert listing() == {f"TCP {cfg.HAND_MADE}": HAND_MADE_LISTING}
    assert vips_on_link() == set()
    restarted.close()


def test_service_named_by_the_config_is_claimed_even_if_made_by_hand(manager):
    ipvsadm("-A", "-t", "10.90.0.1:80", "-s", "lc")
    ipvsadm("-a", "-t", "10.90.0.1:80", "-r", "10.77.3.2:8080", "-m")
    manager.apply(cfg.config_a())
    assert listing() == cfg.LISTING_A
    manager.apply([])
    assert listing() == {}


def test_udp_over_ipv4_and_ipv6_reaches_every_backend(manager):
    manager.apply(cfg.config_b())
    for vip in (cfg.DNS, cfg.DNS6):
        names = {udp_ask(str(vip), 53, f"q{i}".encode()) for i in range(6)}
        assert names == {"b1", "b2", "b3"}, vip


def test_tcp_over_ipv6_carries_traffic(manager):
    web6 = Service("web6", "tcp", cfg.WEB6, 80, tuple(Backend(cfg.V6[i], 8080) for i in (1, 2, 3)), scheduler="rr")
    manager.apply([web6])
    seen = collections.Counter()
    for _ in range(6):
        name, sock, _ = connect(str(cfg.WEB6), 80)
        sock.sendall(b"ping\n")
        assert sock.recv(64) == b"ping\n"
        sock.close()
        seen[name] += 1
    assert seen == {"b1": 2, "b2": 2, "b3": 2}


def test_set_weight_is_kept_by_apply_until_raised_or_the_backend_leaves(manager):
    config = cfg.config_a()
    web = config[0]
    b1 = web.backends[0]
    manager.apply(config)
    assert manager.set_weight(web.key, b1.key, 0) == 0
    assert listing()["TCP 10.90.0.1:80"][1]["10.77.1.2:8080"] == ("Masq", 0)
    assert manager.apply(config).writes == 0
    assert listing()["TCP 10.90.0.1:80"][1]["10.77.1.2:8080"] == ("Masq", 0)
    assert {connect(str(cfg.WEB), 80)[0] for _ in range(4)} == {"b2"}

    assert manager.set_weight(web.key, b1.key, None) == 1
    assert listing() == cfg.LISTING_A

    manager.set_weight(web.key, b1.key, 0)
    without_b1 = [dataclasses.replace(web, backends=web.backends[1:]), *config[1:]]
    manager.apply(without_b1)
    manager.apply(config)
    assert listing()["TCP 10.90.0.1:80"][1]["10.77.1.2:8080"] == ("Masq", 1)
    with pytest.raises(KeyError):
        manager.set_weight(web.key, (cfg.V4[3], 8080), 0)


def test_held_weight_is_written_by_the_next_apply(manager):
    """A restarted daemon holds the weights health wants before its first apply."""
    config = cfg.config_a()
    web = config[0]
    manager.hold_weight(web.key, web.backends[1].key, 0)
    manager.hold_weight(web.key, web.backends[0].key, 1)  # the configured weight: no override
    manager.apply(config)
    assert listing()["TCP 10.90.0.1:80"][1] == {"10.77.1.2:8080": ("Masq", 1), "10.77.2.2:8080": ("Masq", 0)}
    manager.hold_weight(web.key, web.backends[1].key, None)
    assert manager.apply(config).writes == 1
    assert listing() == cfg.LISTING_A


def test_vip_interface_is_created_up_and_follows_the_services(manager):
    assert sh("ip", "link", "show", VIP_LINK, check=False).returncode != 0
    manager.apply(cfg.config_a()[:1])
    link = sh("ip", "-d", "link", "show", VIP_LINK).stdout
    assert "dummy" in link and ",UP" in link
    assert vips_on_link() == {"10.90.0.1"}
    manager.apply([])
    assert vips_on_link() == set()


def test_sysctls_are_set_by_kernel_version(manager):
    release = os.uname().release
    expected_reuse = 1 if sysctls.kernel_version(release) >= (5, 9) else 0
    values = {name: int(Path("/proc/sys/net/ipv4/vs", name).read_text())
              for name in ("conntrack", "expire_nodest_conn", "expire_quiescent_template", "conn_reuse_mode")}
    assert values == {"conntrack": 1, "expire_nodest_conn": 1, "expire_quiescent_template": 1,
                      "conn_reuse_mode": expected_reuse}


def test_dump_with_stats_counts_connections(manager):
    # A VIP of its own: the kernel keeps a deleted destination that still has connections
    # in a trash, per service, and hands it back, counters and all, to the next add of
    # that service's same destination; connections other tests made through 10.90.0.1
    # within the last 2 s were not even folded into the counters yet, so no baseline
    # taken here could see them.
    vip = ipaddress.ip_address("10.90.0.9")
    manager.apply([dataclasses.replace(cfg.config_a()[0], name="stats", vip=vip)])
    key = ("tcp", vip.packed, 80)

    def counts(ipvs):
        (svc,) = [s for s in ipvs.services(stats=True) if s.spec.key == key]
        return svc, ipvs.dests(svc.spec, stats=True)

    with IPVS() as ipvs:
        svc, dests = counts(ipvs)
        before_svc, before_dests = svc.stats.conns, sum(d.stats.conns for d in dests)
        for _ in range(4):
            connect(str(vip), 80)[1].close()
        # The kernel folds its per-CPU counters into what it reports every 2 s.
        deadline = time.monotonic() + 6
        while True:
            svc, dests = counts(ipvs)
            if svc.stats.conns - before_svc == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert svc.stats.conns - before_svc == 4
    assert sorted(d.spec.weight for d in dests) == [1, 1]
    assert sum(d.stats.conns for d in dests) - before_dests == 4
    assert all(d.stats.inpkts > 0 and d.stats.outbytes > 0 for d in dests)


def test_adding_what_exists_and_deleting_what_is_gone_succeed(topo):
    spec = ServiceSpec("tcp", ipaddress.ip_address("10.98.0.1").packed, 80, "rr", 0, 0, 0xFFFFFFFF)
    dest = DestSpec(cfg.V4[1].packed, 8080, 0, 1)
    with IPVS() as ipvs:
        ops = [Op(OpKind.ADD_SERVICE, spec), Op(OpKind.ADD_DEST, spec, dest)]
        assert ipvs.execute(ops) == []
        assert ipvs.execute(ops) == []   # EEXIST: already there
        assert ipvs.execute([Op(OpKind.DELETE_DEST, spec, dest), Op(OpKind.DELETE_DEST, spec, dest)]) == []
        assert ipvs.execute([Op(OpKind.DELETE_SERVICE, spec), Op(OpKind.DELETE_SERVICE, spec)]) == []
        failures = ipvs.execute([Op(OpKind.EDIT_SERVICE, spec)])
        assert [f.errno for f in failures] == [errno.ESRCH]
        assert ipvs.writes == 9


def test_every_service_option_round_trips_through_the_kernel(topo):
    services = [*cfg.config_a(), cfg.config_b()[-1]]
    with IPVS() as ipvs:
        specs = {service_spec(s) for s in services}
        for spec in specs:
            ipvs.add_service(spec)
        assert {s.spec for s in ipvs.services()} == specs
