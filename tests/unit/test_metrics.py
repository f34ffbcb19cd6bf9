"""The metrics exposition, from a daemon's real status snapshot (health engines fed with
tracer records, a refused and an accepted reload), and the dashboard and alert rules checked
against it: every metric they query must be exported."""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipvslb import __version__, config, daemon, health, metrics
from ipvslb.tracer.records import ConnEvent, Kind

ROOT = Path(__file__).resolve().parents[2]
# Series Prometheus makes itself for every scrape target.
SCRAPE_SERIES = {"up"}


class Tracer:
    """What the daemon asks its tracer for, with records handed in by the test."""
    attribution = "kprobe"
    sample_interval = 0.0

    def __init__(self):
        self.batch: list[ConnEvent] = []

    def read(self):
        batch, self.batch = self.batch, []
        return batch

    def lost_records(self):
        return 3

    def missed_runs(self):
        return 0

    def set_vips(self, vips):
        self.vips = list(vips)


class Manager:
    def __init__(self):
        self.weights = {}
        self.drains = frozenset()

    def set_weight(self, service, backend, weight):
        self.weights[(service, backend)] = weight

    def hold_weight(self, service, backend, weight):
        pass

    def apply(self, services, verify=False):
        return SimpleNamespace(writes=0)


@pytest.fixture
def running(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text((ROOT / "examples" / "config.yaml").read_text())
    d = daemon.Daemon(str(path), config.load(path), random.Random(1))
    d.tracer, d.manager, d.rescuer = Tracer(), Manager(), None
    d._start_executor()
    now = time.monotonic()
    d.health = {svc.key: health.ServiceHealth(svc, d.rng, now) for svc in d.cfg.services}
    return d


def _tcp_connects(d, service, times):
    svc = next(s for s in d.cfg.services if s.name == service)
    backend = svc.backends[0].key
    now = time.monotonic()
    for i, seconds in enumerate(times):
        common = dict(sock=1000 + i, protocol="tcp", client=(svc.vip, 40000 + i), vip=(svc.vip, svc.port),
                      backend=backend)
        d.tracer.batch += [ConnEvent(Kind.CONNECT, now, **common),
                           ConnEvent(Kind.ESTABLISHED, now + seconds, elapsed=seconds, **common)]
    d._feed_records()
    return svc, backend


def _samples(d) -> dict:
    text = generate_latest(metrics.registry_for(d.snapshot)).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_connect_histogram_counts_the_timed_connects_per_backend(running):
    svc, backend = _tcp_connects(running, "api", [0.0003, 0.0004, 0.002, 0.3])
    samples = _samples(running)
    lv = {("service", "api"), ("backend", f"{backend[0]}:{backend[1]}")}

    def bucket(le):
        return samples[("ipvslb_backend_connect_seconds_bucket", frozenset(lv | {("le", le)}))]
    assert bucket("0.00025") == 0
    assert bucket("0.0005") == 2
    assert bucket("0.0025") == 3
    assert bucket("0.25") == 3
    assert bucket("0.5") == bucket("+Inf") == 4
    assert samples[("ipvslb_backend_connect_seconds_count", frozenset(lv))] == 4
    assert samples[("ipvslb_backend_connect_seconds_sum", frozenset(lv))] == pytest.approx(0.3027)
    # A backend without timed connects has no histogram (rather than one of zeros).
    other = svc.backends[1].key
    assert not any(name == "ipvslb_backend_connect_seconds_count" and ("backend", f"{other[0]}:{other[1]}") in lv_
                   for name, lv_ in samples)


def test_build_info_reloads_and_standard_collectors(running, tmp_path):
    before = time.time()
    Path(running.config_path).write_text("services: [")
    running.reload()
    samples = _samples(running)
    assert samples[("ipvslb_reloads_total", frozenset({("outcome", "failed")}))] == 1
    assert samples[("ipvslb_reloads_total", frozenset({("outcome", "ok")}))] == 0
    loaded_at = samples[("ipvslb_last_reload_success_timestamp_seconds", frozenset())]
    assert loaded_at <= before  # the start-up load; the refused reload does not move it

    Path(running.config_path).write_text((ROOT / "examples" / "config.yaml").read_text())
    running.reload()
    samples = _samples(running)
    assert samples[("ipvslb_reloads_total", frozenset({("outcome", "ok")}))] == 1
    assert samples[("ipvslb_last_reload_success_timestamp_seconds", frozenset())] >= before
    assert samples[("ipvslb_build_info", frozenset({("version", __version__)}))] == 1
    names = {name for name, _ in samples}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
            "python_info", "python_gc_collections_total"} <= names


def test_reload_keeps_the_histograms_of_backends_that_stay(running):
    _, backend = _tcp_connects(running, "api", [0.001])
    running.reload()
    hist = running.snapshot().services[0].backends[0].connect_seconds
    assert hist is not None and hist.buckets[-1] == 1


def _queried_metrics(exprs: list[str]) -> set[str]:
    """Metric names in PromQL expressions: the prefixed ones, and any name a selector's `{`
    follows (which catches the others, e.g. `up`)."""
    names = set()
    for expr in exprs:
        expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
        names |= set(re.findall(r"\b(?:ipvslb|process|python)_[a-z0-9_]+\b", expr))
        names |= set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
    return names


def _dashboard_exprs() -> list[str]:
    doc = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if v.get("definition")]
    return exprs


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", [_dashboard_exprs, _rule_exprs], ids=["dashboard", "alerts"])
def test_every_metric_the_dashboard_and_alerts_query_is_exported(running, source):
    _tcp_connects(running, "api", [0.001])
    running.reload()
    exported = {name for name, _ in _samples(running)} | SCRAPE_SERIES
    queried = _queried_metrics(source())
    assert len(queried) >= 5, queried
    assert queried - exported == set()


def test_the_alert_rules_cover_the_documented_conditions():
    alerts = {r["alert"] for g in yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    assert {"IpvslbDaemonDown", "IpvslbBackendOut", "IpvslbOneUsableBackendLeft", "IpvslbServiceFrozen",
            "IpvslbTracerLostRecords"} <= alerts
