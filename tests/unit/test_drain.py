"""Drains in the IPVS manager: weight 0 over health's weights and the configuration, kept in
the state directory across restarts, ended with the backend's removal."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from ipvslb.drains import Drains
from tests.unit.test_daemon_faults import place  # noqa: F401
from tests.unit.test_ipvs_manager import DNS, WEB, B, FakeVips, sysctl_root, weights, world  # noqa: F401

HEAVY = dataclasses.replace(B[2], weight=5)
WEB5 = dataclasses.replace(WEB, backends=(B[1], HEAVY))


def test_a_drain_sets_weight_0_at_once_and_apply_keeps_it(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5])
    writes = m.writes
    assert m.drain(WEB5.key, HEAVY.key, True) == 0
    assert m.writes == writes + 1
    assert weights(kernel) == {(1, 8080): 1, (2, 8080): 0}
    assert m.apply([WEB5]).writes == 0
    assert m.apply([WEB5], verify=True).writes == 0
    assert weights(kernel)[(2, 8080)] == 0


def test_health_cannot_raise_a_drained_backend_and_undrain_restores_healths_weight(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5])
    m.drain(WEB5.key, HEAVY.key, True)
    assert m.set_weight(WEB5.key, HEAVY.key, 5) == 0     # health re-admits: still drained
    assert m.set_weight(WEB5.key, HEAVY.key, 2) == 0     # a ramp step: still drained
    assert weights(kernel)[(2, 8080)] == 0
    assert m.drain(WEB5.key, HEAVY.key, False) == 2      # the ramp's weight, not the configured 5
    assert weights(kernel)[(2, 8080)] == 2
    m.set_weight(WEB5.key, HEAVY.key, None)
    assert weights(kernel)[(2, 8080)] == 5


def test_a_quarantined_backend_undrained_stays_at_healths_0(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5])
    m.drain(WEB5.key, HEAVY.key, True)
    m.hold_weight(WEB5.key, HEAVY.key, 0)
    assert m.drain(WEB5.key, HEAVY.key, False) == 0
    assert m.apply([WEB5]).writes == 0


def test_drains_outlive_the_manager_and_apply_at_start(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5])
    m.drain(WEB5.key, HEAVY.key, True)
    doc = json.loads((Path(settings.state_dir) / "drains.json").read_text())
    assert doc == {"format": 1, "drains": [["tcp", "10.90.0.1", 80, "10.77.2.2", 8080]]}
    kernel.dests.clear()
    kernel.services.clear()   # as after a reboot: the new manager creates everything
    restarted = start()
    restarted.apply([WEB5])
    assert weights(kernel) == {(1, 8080): 1, (2, 8080): 0}
    assert (WEB5.key, HEAVY.key) in restarted.drains


def test_a_drain_ends_when_its_backend_leaves_the_configuration(world, caplog):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5])
    m.drain(WEB5.key, HEAVY.key, True)
    without = dataclasses.replace(WEB5, backends=(B[1],))
    with caplog.at_level(logging.WARNING):
        m.apply([without])
    assert "drain of 10.77.2.2:8080 in tcp 10.90.0.1:80 ended: the backend left the configuration" in caplog.text
    assert not m.drains and not Drains(settings.state_dir)
    m.apply([WEB5])   # back in the configuration: not drained
    assert weights(kernel) == {(1, 8080): 1, (2, 8080): 5}


def test_a_drain_survives_a_reload_that_keeps_its_backend(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5, DNS])
    m.drain(WEB5.key, HEAVY.key, True)
    m.apply([dataclasses.replace(WEB5, scheduler="rr"), DNS], verify=True)
    assert weights(kernel)[(2, 8080)] == 0


def test_unknown_backends_and_services_raise_keyerror_and_record_nothing(world):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5])
    with pytest.raises(KeyError):
        m.drain(WEB5.key, B[3].key, True)
    with pytest.raises(KeyError):
        m.drain(DNS.key, B[1].key, True)
    assert not (Path(settings.state_dir) / "drains.json").exists()


def test_a_record_that_cannot_be_written_changes_nothing(world, monkeypatch):
    kernel, vips, settings, start = world
    m = start()
    m.apply([WEB5])

    def full(path, doc):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("ipvslb.statedir.write_json", full)
    with pytest.raises(OSError):
        m.drain(WEB5.key, HEAVY.key, True)
    assert not m.drains and weights(kernel)[(2, 8080)] == 5


def test_an_unreadable_record_is_ignored_with_an_error(tmp_path, caplog):
    (tmp_path / "drains.json").write_text("{not json")
    with caplog.at_level(logging.ERROR):
        assert not Drains(tmp_path)
    assert "ignoring unreadable" in caplog.text


def test_the_drained_metric():
    from ipvslb import metrics
    from tests.unit import snapshots

    doc = snapshots.snapshot([snapshots.service("web", backends=[
        snapshots.backend("10.77.2.2:8080", weight=0, configured_weight=5, drained=True),
        snapshots.backend("10.77.1.2:8080", weight=1, configured_weight=1)])])
    values = {tuple(s.labels.values()): s.value for family in metrics.SnapshotCollector(lambda: doc).collect()
              if family.name == "ipvslb_backend_drained" for s in family.samples}
    assert values == {("web", "10.77.2.2:8080"): 1.0, ("web", "10.77.1.2:8080"): 0.0}


def test_the_control_socket_setting():
    from ipvslb import config

    service = "services: []\n"
    assert config.parse(service).settings.control_path() == "/run/ipvslb/control.sock"
    moved = config.parse("settings: {status_socket: /run/lb/s.sock}\n" + service).settings
    assert moved.control_socket is None and moved.control_path() == "/run/lb/control.sock"
    assert config.parse("settings: {control_socket: /run/lb/c.sock}\n" + service).settings.control_path() \
        == "/run/lb/c.sock"
    assert config.parse("settings: {control_socket: null}\n" + service).settings.control_socket is None
    with pytest.raises(config.ConfigError) as err:
        config.parse("settings: {control_socket: c.sock}\n" + service)
    assert "settings.control_socket: not an absolute path: got 'c.sock'" in err.value.messages[0]
    warned = config.unit_warnings(config.parse("settings: {control_socket: /tmp/c.sock}\n" + service))
    assert [line.split(": ")[1] for line in warned] == ["settings.control_socket"]


def test_the_daemon_serves_drains_shows_them_and_keeps_them_across_restart_and_reload(place, caplog):
    from tests.unit.test_daemon_faults import WEB as WEB_YAML
    from tests.unit.test_daemon_faults import make, started

    def request(d, command, backend="10.77.0.2:80"):
        return d._control(json.dumps({"command": command, "service": "web", "backend": backend}).encode())

    d, kernel, tracer = make(place, WEB_YAML)
    started(d)
    answer = request(d, "drain")
    assert answer["ok"] and answer["drained"] and answer["weight"] == 0
    rows = {r.endpoint: r for r in d.snapshot().services[0].backends}
    assert rows["10.77.0.2:80"].drained is True and rows["10.77.0.2:80"].weight == 0
    assert rows["10.77.0.2:80"].state == "healthy" and rows["10.77.0.1:80"].drained is False
    with pytest.raises(Exception, match='no service "db"'):
        d._control(json.dumps({"command": "drain", "service": "db", "backend": "10.77.0.2:80"}).encode())

    # A restart over the same state directory and kernel: still drained, and health does
    # not take the kernel's 0 for a quarantine to resume.
    again, _, _ = make(place, WEB_YAML)
    again._manager_factory = d._manager_factory
    started(again)
    rows = {r.endpoint: r for r in again.snapshot().services[0].backends}
    assert rows["10.77.0.2:80"].drained is True and rows["10.77.0.2:80"].state == "healthy"
    assert again.manager.apply(again.cfg.services, verify=True).writes == 0

    # A reload that keeps the backend keeps the drain; undrain gives the configured weight back.
    again.reload()
    assert request(again, "drained")["drained"] is True
    answer = request(again, "undrain")
    assert answer["drained"] is False and answer["weight"] == 1 and answer["changed"] is True
