"""Only VIPs the daemon added are its own, and none is removed while an IPVS service still
uses it; a hand-made service the configuration names is adopted, with a log line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ipvslb.ipvs.client import IPVS
from ipvslb.ipvs.specs import ServiceSpec
from tests.unit.fake_ipvs import FAMILY
from tests.unit.test_ipvs_manager import DNS, WEB, ip, sysctl_root, world  # noqa: F401 (fixtures)


def owned(settings) -> dict:
    return json.loads((Path(settings.state_dir) / "owned.json").read_text())


def test_a_vip_an_administrator_added_is_never_recorded_nor_removed(world):
    kernel, vips, settings, start = world
    vips.addresses_now.add(WEB.vip.packed)   # there before the daemon
    m = start()
    m.apply([WEB, DNS])
    assert owned(settings)["vips"] == ["10.90.0.2"]
    m.apply([DNS])
    assert WEB.vip.packed in vips.addresses_now
    m.apply([])
    assert vips.addresses_now == {WEB.vip.packed}


def test_a_vip_of_ours_stays_while_a_foreign_service_uses_it(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB])
    assert owned(settings)["vips"] == ["10.90.0.1"]
    hand_made = ServiceSpec("tcp", WEB.vip.packed, 443, "wlc", 0, 0, 0xFFFFFFFF)
    IPVS(sock=kernel, family=FAMILY).add_service(hand_made)
    m.apply([], verify=True)
    assert len(kernel.services) == 1            # ours deleted, theirs kept
    assert WEB.vip.packed in vips.addresses_now  # their service still needs the address
    assert owned(settings)["vips"] == ["10.90.0.1"]
    IPVS(sock=kernel, family=FAMILY).delete_service(hand_made)
    m.apply([], verify=True)
    assert vips.addresses_now == set()
    assert owned(settings)["vips"] == []


def test_a_hand_made_service_the_configuration_names_is_adopted_with_a_log_line(world, caplog):
    kernel, vips, settings, start = world
    IPVS(sock=kernel, family=FAMILY).add_service(ServiceSpec("tcp", WEB.vip.packed, 80, "rr", 0, 0, 0xFFFFFFFF))
    with caplog.at_level(logging.WARNING, logger="ipvslb.ipvs.manager"):
        start().apply([WEB])
        start().apply([WEB])   # a restart: already ours, no second line
    lines = [r.getMessage() for r in caplog.records if "adopting" in r.getMessage()]
    assert lines == ["adopting IPVS service tcp 10.90.0.1:80, not created by ipvslb: it now follows the "
                     "configuration, and is deleted when it leaves it"]
    assert owned(settings)["services"] == [["tcp", "10.90.0.1", 80]]


def test_the_record_is_written_through_a_temporary_file_of_its_own_and_synced_with_its_directory(tmp_path,
                                                                                               monkeypatch):
    import os
    import stat

    from ipvslb.ipvs import ownership
    renamed, synced = [], []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(src).name) or replace(src, dst))
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or fsync(fd))
    record = ownership.Ownership(tmp_path)
    record.record(frozenset(), frozenset({WEB.vip.packed}))
    record.record(frozenset(), frozenset({DNS.vip.packed}))
    assert len(set(renamed)) == 2 and all(name.startswith(".owned.json.") for name in renamed)
    assert synced == [False, True, False, True]   # the file, then the directory holding the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owned.json"]
    assert ownership.Ownership(tmp_path).vips == {DNS.vip.packed}


def test_the_record_reads_back_as_written_for_every_address_family(tmp_path):
    import ipaddress

    from ipvslb.ipvs import ownership
    addresses = [ipaddress.ip_address(a).packed for a in ("10.0.0.1", "fd00::1", "::ffff:10.1.2.3", "::", "2001:db8::")]
    services = frozenset((proto, a, port) for a in addresses for proto, port in (("tcp", 80), ("udp", 53)))
    ownership.Ownership(tmp_path).record(services, frozenset(addresses))
    back = ownership.Ownership(tmp_path)
    assert (back.services, back.vips) == (services, frozenset(addresses))
    text = (tmp_path / "owned.json").read_text()
    assert json.loads(text)["format"] == ownership.FORMAT and text.count("\n") == 5   # a line per key
