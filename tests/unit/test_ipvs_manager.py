"""apply / set_weight / ownership / VIPs over the fake kernel and a fake VIP interface."""
from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest

from ipvslb.ipvs import ApplyError, Manager
from ipvslb.ipvs.client import IPVS
from ipvslb.ipvs.specs import ServiceSpec
from ipvslb.model import Backend, Service, Settings, Sysctls
from tests.unit.fake_ipvs import FAMILY, FakeKernel

ip = ipaddress.ip_address
B = {i: Backend(ip(f"10.77.{i}.2"), 8080) for i in (1, 2, 3)}
WEB = Service("web", "tcp", ip("10.90.0.1"), 80, (B[1], B[2]))
DNS = Service("dns", "udp", ip("10.90.0.2"), 53, (B[1], B[2], B[3]), scheduler="rr")
DNS_TCP = Service("dns-tcp", "tcp", ip("10.90.0.2"), 53, (B[1],))
WEB6 = Service("web6", "tcp", ip("fd90::1"), 80, (Backend(ip("fd77:1::2"), 8080, 2),))
FOREIGN = ServiceSpec("tcp", ip("10.99.0.1").packed, 80, "lc", 0, 0, 0xFFFFFFFF)


class FakeVips:
    def __init__(self):
        self.addresses_now: set[bytes] = set()
        self.writes = 0

    def ensure(self):
        return 1

    def addresses(self):
        return set(self.addresses_now)

    def add(self, vip):
        self.writes += 1
        self.addresses_now.add(vip)

    def remove(self, vip):
        self.writes += 1
        self.addresses_now.discard(vip)

    def close(self):
        pass


@pytest.fixture
def sysctl_root(tmp_path):
    root = tmp_path / "vs"
    root.mkdir()
    for name in ("conntrack", "expire_nodest_conn", "expire_quiescent_template", "conn_reuse_mode"):
        (root / name).write_text("0\n")
    return root


@pytest.fixture
def world(tmp_path, sysctl_root):
    kernel, vips = FakeKernel(), FakeVips()
    settings = Settings(state_dir=str(tmp_path / "state"), sysctls=Sysctls(conn_reuse_mode=1))

    def start() -> Manager:
        return Manager(settings, ipvs=IPVS(sock=kernel, family=FAMILY), vips=vips, sysctl_root=sysctl_root)

    return kernel, vips, settings, start


def weights(kernel, vip: str = "10.90.0.1", port: int = 80) -> dict:
    for sid, dests in kernel.dests.items():
        if sid[2][:4] == ip(vip).packed and sid[3] == port:
            return {(d[0][2], d[1]): options["IPVS_DEST_ATTR_WEIGHT"] for d, options in dests.items()}
    raise KeyError(vip)


def test_first_apply_creates_everything_and_the_second_writes_nothing(world, sysctl_root):
    kernel, vips, settings, start = world
    m = start()
    first = m.apply([WEB, DNS, DNS_TCP, WEB6])
    assert first.writes == 4 + 7 + 3  # services, destinations, distinct VIPs
    assert vips.addresses_now == {ip("10.90.0.1").packed, ip("10.90.0.2").packed, ip("fd90::1").packed}
    assert m.apply([WEB, DNS, DNS_TCP, WEB6]) == ([], 0, [])
    assert (sysctl_root / "conn_reuse_mode").read_text() == "1\n"


def test_foreign_service_is_never_touched_and_removed_ones_are_deleted_with_their_vips(world):
    kernel, vips, settings, start = world
    IPVS(sock=kernel, family=FAMILY).add_service(FOREIGN)
    vips.addresses_now.add(ip("10.99.0.1").packed)   # someone else's address on our link
    m = start()
    m.apply([WEB, DNS, DNS_TCP])
    result = m.apply([DNS_TCP])
    assert sorted(op.kind for op in result.ops) == ["delete-service", "delete-service"]
    assert len(kernel.services) == 2
    assert vips.addresses_now == {ip("10.90.0.2").packed, ip("10.99.0.1").packed}   # shared VIP stays
    owned = json.loads((Path(settings.state_dir) / "owned.json").read_text())
    assert owned["services"] == [["tcp", "10.90.0.2", 53]] and owned["vips"] == ["10.90.0.2"]


def test_ownership_outlives_the_manager(world):
    kernel, vips, settings, start = world
    start().apply([WEB, DNS])
    restarted = start()
    assert restarted.apply([DNS]).ops[0].kind == "delete-service"
    assert len(kernel.services) == 1


def test_lowered_weight_is_kept_until_raised_and_forgotten_with_the_backend(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    assert m.set_weight(WEB.key, B[1].key, 0) == 0
    assert weights(kernel) == {(1, 8080): 0, (2, 8080): 1}
    assert m.apply([WEB]).writes == 0
    raised = dataclasses.replace(WEB, backends=(dataclasses.replace(B[1], weight=5), B[2]))
    m.apply([raised])
    assert weights(kernel)[(1, 8080)] == 0       # the configured weight changed, the hold did not
    assert m.set_weight(WEB.key, B[1].key, 3) == 3
    assert m.set_weight(WEB.key, B[1].key, 9) == 5   # at or above the configured weight: released
    m.apply([raised])
    assert weights(kernel)[(1, 8080)] == 5

    m.set_weight(WEB.key, B[1].key, 0)
    m.apply([dataclasses.replace(WEB, backends=(B[2],))])
    m.apply([WEB])
    assert weights(kernel)[(1, 8080)] == 1
    with pytest.raises(KeyError):
        m.set_weight(WEB.key, B[3].key, 0)


def test_held_weight_is_written_by_the_first_apply(world):
    kernel, vips, settings, start = world
    m = start()
    m.hold_weight(WEB.key, B[2].key, 0)
    m.apply([WEB])
    assert weights(kernel) == {(1, 8080): 1, (2, 8080): 0}


def test_failed_writes_raise_after_the_rest_is_done_and_keep_ownership(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB, DNS])

    original = kernel._change

    def refuse_deletes(cmd, msg):
        return 16 if cmd == 3 else original(cmd, msg)   # EBUSY on IPVS_CMD_DEL_SERVICE

    kernel._change = refuse_deletes
    with pytest.raises(ApplyError) as err:
        m.apply([WEB])
    assert [f.op.kind for f in err.value.result.failures] == ["delete-service"]
    assert "1 of 1 IPVS changes failed: delete-service udp 10.90.0.2:53: EBUSY" in str(err.value)
    assert ip("10.90.0.2").packed in vips.addresses_now
    kernel._change = original
    assert [op.kind for op in m.apply([WEB]).ops] == ["delete-service"]


def test_duplicate_services_are_refused(world):
    with pytest.raises(ValueError):
        world[3]().apply([WEB, dataclasses.replace(WEB, name="again")])


def test_unreadable_state_file_means_owning_nothing(world):
    kernel, vips, settings, start = world
    start().apply([WEB])
    (Path(settings.state_dir) / "owned.json").write_text("{not json")
    assert start().apply([]).ops == []
    assert len(kernel.services) == 1
