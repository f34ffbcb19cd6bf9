"""apply / set_weight / ownership / VIPs over the fake kernel and a fake VIP interface."""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
import time
from pathlib import Path

import pytest

from ipvslb.ipvs import ApplyError, IPVSError, Manager, messages
from ipvslb.ipvs.client import IPVS
from ipvslb.ipvs.specs import ServiceSpec, dest_spec, service_spec
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
        self.reads = 0

    def ensure(self):
        self.reads += 1
        return 1

    def addresses(self):
        self.reads += 1
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

    def start(clock=time.monotonic) -> Manager:
        return Manager(settings, ipvs=IPVS(sock=kernel, family=FAMILY), vips=vips, sysctl_root=sysctl_root,
                       clock=clock)

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
    assert sorted(op.kind.value for op in result.ops) == ["delete-service", "delete-service"]
    assert len(kernel.services) == 2
    assert vips.addresses_now == {ip("10.90.0.2").packed, ip("10.99.0.1").packed}   # shared VIP stays
    owned = json.loads((Path(settings.state_dir) / "owned.json").read_text())
    assert owned["services"] == [["tcp", "10.90.0.2", 53]] and owned["vips"] == ["10.90.0.2"]


def test_ownership_outlives_the_manager(world):
    kernel, vips, settings, start = world
    start().apply([WEB, DNS])
    restarted = start()
    assert restarted.apply([DNS]).ops[0].kind.value == "delete-service"
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
    assert [f.op.kind.value for f in err.value.result.failures] == ["delete-service"]
    assert "1 of 1 IPVS changes failed: delete-service udp 10.90.0.2:53: EBUSY" in str(err.value)
    assert ip("10.90.0.2").packed in vips.addresses_now
    kernel._change = original
    assert [op.kind.value for op in m.apply([WEB]).ops] == ["delete-service"]


def test_duplicate_services_are_refused(world):
    with pytest.raises(ValueError):
        world[3]().apply([WEB, dataclasses.replace(WEB, name="again")])


def test_unreadable_state_file_means_owning_nothing(world):
    kernel, vips, settings, start = world
    start().apply([WEB])
    (Path(settings.state_dir) / "owned.json").write_text("{not json")
    assert start().apply([]).ops == []
    assert len(kernel.services) == 1


# --- the snapshot: trust what we wrote, verify periodically --------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reads(kernel, vips) -> int:
    """IPVS dumps and VIP interface look-ups so far."""
    dumps = sum(1 for cmd in kernel.commands if cmd in (messages.CMD_GET_SERVICE, messages.CMD_GET_DEST))
    return dumps + vips.reads


def traffic(kernel, vips) -> tuple[int, int]:
    return reads(kernel, vips), len(kernel.commands) + vips.writes


def refuse(kernel, command: int, code: int = 16):
    """Make the fake kernel fail `command` with `code` (EBUSY) from now on."""
    original = kernel._change
    kernel._change = lambda cmd, msg: code if cmd == command else original(cmd, msg)
    return original


def test_no_op_apply_reads_and_writes_nothing(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB, DNS, WEB6])
    before = traffic(kernel, vips)
    assert m.apply([WEB, DNS, WEB6]) == ([], 0, [])
    assert traffic(kernel, vips) == before
    assert m.verifies == 1


def test_a_change_from_the_snapshot_sends_only_its_writes_and_reads_nothing(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB, DNS])
    before = reads(kernel, vips)
    changed = dataclasses.replace(WEB, backends=(dataclasses.replace(B[1], weight=4), B[3]))
    result = m.apply([changed, DNS_TCP])
    assert reads(kernel, vips) == before
    assert sorted(op.kind.value for op in result.ops) == ["add-dest", "add-dest", "add-service", "delete-dest",
                                                    "delete-service", "edit-dest"]
    assert weights(kernel) == {(1, 8080): 4, (3, 8080): 1}
    assert m.apply([changed, DNS_TCP]).writes == 0


def test_a_trusted_apply_plans_only_services_that_are_not_the_objects_last_applied(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB, DNS])
    # What the snapshot says of WEB, made wrong: a plan that looked would repair it.
    m._snapshot.dests[("tcp", WEB.vip.packed, 80)][(B[1].address.packed, 8080)] = _web_with(B[1], 9)[1]
    assert m.apply([WEB, DNS]).ops == []   # the same objects: not looked at
    equal = dataclasses.replace(WEB)       # equal, but another object: planned
    assert [(op.kind.value, op.dest.weight) for op in m.apply([equal, DNS]).ops] == [("edit-dest", 1)]


def test_a_weight_written_outside_apply_is_planned_again(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    m.set_weight(WEB.key, B[1].key, 0)
    m.hold_weight(WEB.key, B[1].key, None)  # health gives it back; the next apply writes it
    assert m.apply([WEB]).writes == 1 and weights(kernel)[(1, 8080)] == 1


def test_any_sequence_of_applies_and_weight_changes_leaves_the_kernel_as_wanted(world):
    """Same objects, equal new objects and changed services, between weight writes,
    holds and drains: after each apply the kernel (read back) is what is wanted."""
    kernel, vips, settings, start = world
    rng = random.Random(3)
    m = start()
    pool = [WEB, DNS, DNS_TCP, WEB6]
    applied: list[Service] = []
    wanted: list[Service] = [WEB, DNS]
    held: dict[tuple, int] = {}   # (service key, backend key) -> weight health wants
    drained: set[tuple] = set()
    for step in range(1500):
        match rng.randrange(6):
            case 0:
                wanted = rng.sample(pool, rng.randint(1, len(pool)))
            case 1:
                wanted = [dataclasses.replace(s) for s in wanted]
            case 2:
                i = rng.randrange(len(wanted))
                backends = tuple(dataclasses.replace(b, weight=rng.randint(1, 3)) for b in wanted[i].backends)
                wanted[i] = dataclasses.replace(wanted[i], backends=backends)
            case 3 | 4 | 5 if applied:
                svc = rng.choice(applied)
                backend = rng.choice(svc.backends)
                slot = (svc.key, backend.key)
                if step % 3 == 0:
                    drain = rng.random() < 0.5
                    m.drain(svc.key, backend.key, drain)
                    drained = drained | {slot} if drain else drained - {slot}
                else:
                    weight = rng.choice([0, 1, 2, None])
                    (m.set_weight if step % 2 else m.hold_weight)(svc.key, backend.key, weight)
                    # (set_weight gives a backend back to the configuration at its weight.)
                    if weight is None or step % 2 and weight >= backend.weight:
                        held.pop(slot, None)
                    else:
                        held[slot] = weight
        if rng.random() < 0.5:
            continue  # more than one change between two applies
        m.apply(wanted, verify=rng.random() < 0.1)
        applied = list(wanted)
        configured = {(s.key, b.key): b.weight for s in applied for b in s.backends}
        held = {k: w for k, w in held.items() if k in configured and w < configured[k]}
        drained &= configured.keys()
        client = IPVS(sock=kernel, family=FAMILY)
        got = {ks.spec: {d.spec for d in client.dests(ks.spec)} for ks in client.services()}
        want = {service_spec(s): {dest_spec(s, b, 0 if (s.key, b.key) in drained else min(b.weight, held.get(
            (s.key, b.key), b.weight))) for b in s.backends} for s in applied}
        assert got == want, f"step {step}"


def test_a_stale_snapshot_is_verified_first(world):
    kernel, vips, settings, start = world
    clock = Clock()
    m = start(clock)
    m.apply([WEB])
    clock.now += settings.ipvs_verify_interval - 0.5
    before = reads(kernel, vips)
    m.apply([WEB])
    assert reads(kernel, vips) == before
    clock.now += 1
    m.apply([WEB])
    assert reads(kernel, vips) > before and m.verifies == 2


def test_verify_forces_a_full_read_and_repairs_what_others_changed(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    sid = next(iter(kernel.dests))
    kernel.dests[sid].clear()                       # an `ipvsadm -d` of both backends
    assert m.apply([WEB]).writes == 0               # trusted: not noticed yet
    before = reads(kernel, vips)
    result = m.apply([WEB], verify=True)
    assert reads(kernel, vips) > before
    assert [op.kind.value for op in result.ops] == ["add-dest", "add-dest"]
    assert weights(kernel) == {(1, 8080): 1, (2, 8080): 1}


def test_a_failed_write_drops_the_snapshot(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    original = refuse(kernel, messages.CMD_SET_DEST)
    with pytest.raises(ApplyError) as err:
        m.apply([dataclasses.replace(WEB, backends=(dataclasses.replace(B[1], weight=2), B[2]))])
    assert m.verifies == 2                          # planned again from a full read, refused again
    assert [op.kind.value for op in err.value.result.ops] == ["edit-dest"] and err.value.result.writes == 2
    kernel._change = original
    before = reads(kernel, vips)
    m.apply([WEB])
    assert reads(kernel, vips) > before and m.verifies == 3


def test_a_write_failing_on_what_others_removed_is_planned_again_from_the_kernel(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    sid = next(iter(kernel.dests))
    del kernel.dests[sid][next(iter(kernel.dests[sid]))]   # `ipvsadm -d` of backend 1
    heavier = dataclasses.replace(WEB, backends=(dataclasses.replace(B[1], weight=2), B[2]))
    result = m.apply([heavier])                          # edit-dest: ENOENT, then verified
    assert ([op.kind.value for op in result.ops], result.writes, result.failures) == (["add-dest"], 2, [])
    assert weights(kernel) == {(1, 8080): 2, (2, 8080): 1}


def test_a_netlink_error_drops_the_snapshot(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])

    def lost(data):
        raise OSError(105, "No buffer space available")   # ENOBUFS: outcome unknown

    kernel.send, send = lost, kernel.send
    with pytest.raises(OSError):
        m.apply([WEB, DNS])
    kernel.send = send
    verifies = m.verifies
    m.apply([WEB, DNS])
    assert m.verifies == verifies + 1
    assert len(kernel.services) == 2


def test_a_snapshot_proved_wrong_by_the_kernel_is_replaced_in_the_same_apply(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    # Someone adds, by hand, the backend the next configuration adds, with another weight.
    IPVS(sock=kernel, family=FAMILY).add_dest(*_web_with(B[3], weight=9))
    result = m.apply([dataclasses.replace(WEB, backends=(B[1], B[2], B[3]))])
    assert ([op.kind.value for op in result.ops], result.writes) == (["edit-dest"], 2)   # EEXIST, then verified
    assert weights(kernel) == {(1, 8080): 1, (2, 8080): 1, (3, 8080): 1}
    assert m.verifies == 2


def _web_with(backend, weight):
    return service_spec(WEB), dest_spec(WEB, dataclasses.replace(backend, weight=weight))


def test_set_weight_keeps_the_snapshot_and_a_failed_one_drops_it(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    m.set_weight(WEB.key, B[1].key, 0)
    before = traffic(kernel, vips)
    assert m.apply([WEB]).writes == 0 and traffic(kernel, vips) == before

    refuse(kernel, messages.CMD_SET_DEST, code=2)   # ENOENT: removed by hand
    with pytest.raises(IPVSError):
        m.set_weight(WEB.key, B[1].key, None)
    assert m.verifies == 1
    with pytest.raises(ApplyError):
        m.apply([WEB])                               # the held weight's edit is refused again
    assert m.verifies == 2


def test_a_service_the_snapshot_saw_but_did_not_read_is_verified_before_it_is_claimed(world):
    kernel, vips, settings, start = world
    IPVS(sock=kernel, family=FAMILY).add_service(FOREIGN)
    m = start()
    m.apply([WEB])
    claimed = Service("claimed", "tcp", ip("10.99.0.1"), 80, (B[1],))
    m.apply([WEB, claimed])
    assert m.verifies == 2
    assert weights(kernel, "10.99.0.1") == {(1, 8080): 1}
