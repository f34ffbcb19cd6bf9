"""Verify the ipvslb role in the VM: package, service, rendered config, IPVS against the
inventory (`ipvsadm -Ln` is the oracle), quarantine of a failed backend, and a changed
inventory taken with a reload, not a restart.

The tests run in file order and the last two change the guest (a backend stops and comes
back; the inventory changes), so keep them last.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

COMMON = Path(__file__).resolve().parents[1]
CONFIG = "/etc/ipvslb/config.yaml"
SERVICE_KEYS = ["name", "protocol", "vip", "port", "scheduler", "scheduler_flags", "persistence_timeout",
                "forwarding", "backends", "health"]


# --- helpers -----------------------------------------------------------------------------

def inventory_vars() -> dict:
    """The group_vars of the Molecule inventory (what converge applied)."""
    return yaml.safe_load((COMMON / "inventory" / "group_vars" / "all.yml").read_text())


def expected_services(variables: dict) -> list[dict]:
    """ipvslb_services as the role must render them: health merged over the defaults."""
    defaults = variables.get("ipvslb_health_defaults", {})
    out = []
    for service in variables["ipvslb_services"]:
        s = dict(service)
        health = {**defaults, **service.get("health", {})}
        if health:
            s["health"] = health
        out.append(s)
    return out


def backend_endpoint(backend, service_port: int) -> tuple[str, int, int]:
    """(address, port, weight) of a backend in either of its inventory forms."""
    if isinstance(backend, dict):
        return backend["address"], backend.get("port", service_port), backend.get("weight", 1)
    m = re.fullmatch(r"\[(.+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?|([0-9a-fA-F:]+)", backend)
    address = m.group(1) or m.group(3) or m.group(5)
    port = m.group(2) or m.group(4)
    return address, int(port) if port else service_port, 1


def fmt(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"


def expected_ipvs(services: list[dict]) -> dict:
    """{'TCP 10.255.0.1:80': {'scheduler': 'rr', 'backends': {'10.77.1.2:8080': ('Masq', 1)}}}"""
    forward = {"masq": "Masq", "route": "Route", "tunnel": "Tunnel"}
    table = {}
    for s in services:
        key = f"{s.get('protocol', 'tcp').upper()} {fmt(s['vip'], s['port'])}"
        backends = {}
        for b in s["backends"]:
            address, port, weight = backend_endpoint(b, s["port"])
            backends[fmt(address, port)] = (forward[s.get("forwarding", "masq")], weight)
        table[key] = {"scheduler": s.get("scheduler", "wlc"), "backends": backends}
    return table


def ipvsadm(host) -> dict:
    """The kernel's IPVS table, parsed from `ipvsadm -Ln`, in expected_ipvs' shape."""
    table, current = {}, None
    for line in host.check_output("ipvsadm -Ln").splitlines():
        m = re.match(r"^(TCP|UDP|SCTP)\s+(\S+)\s+(\S+)", line)
        if m:
            current = f"{m.group(1)} {m.group(2)}"
            table[current] = {"scheduler": m.group(3), "backends": {}}
            continue
        m = re.match(r"^\s+->\s+(\S+)\s+(\w+)\s+(\d+)\s+\d+\s+\d+", line)
        if m and current:
            table[current]["backends"][m.group(1)] = (m.group(2), int(m.group(3)))
    return table


def status(host) -> dict:
    return json.loads(host.check_output("ipvslb status --json"))


def backend_status(host, endpoint: str) -> dict:
    for service in status(host)["services"]:
        for backend in service["backends"]:
            if backend["endpoint"] == endpoint:
                return backend
    raise KeyError(endpoint)


def main_pid(host) -> int:
    return int(host.check_output("systemctl show -p MainPID --value ipvslb"))


def n_restarts(host) -> int:
    return int(host.check_output("systemctl show -p NRestarts --value ipvslb"))


def wait_for(what: str, predicate, timeout: float = 60, interval: float = 1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def connect(host, vip: str, port: int, count: int) -> tuple[int, int]:
    """count TCP connects (with an HTTP request) from the guest to vip:port: (ok, failed)."""
    script = (
        "import socket,sys\n"
        "ok=failed=0\n"
        f"for _ in range({count}):\n"
        "    try:\n"
        f"        s=socket.create_connection(('{vip}',{port}),timeout=2)\n"
        "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.recv(100); s.close(); ok+=1\n"
        "    except OSError:\n"
        "        failed+=1\n"
        "print(ok,failed)\n"
    )
    ok, failed = host.check_output(f"python3 -c {shlex.quote(script)}").split()
    return int(ok), int(failed)


# --- the tests ---------------------------------------------------------------------------

def test_package_installed(host):
    package = host.package("ipvslb")
    assert package.is_installed
    assert host.package(f"linux-headers-{host.check_output('uname -r')}").is_installed
    assert host.package("ipvsadm").is_installed


def test_apt_source_signed_by_keyring(host):
    sources = host.file("/etc/apt/sources.list.d/ipvslb.sources")
    assert sources.exists
    assert "Signed-By: /etc/apt/keyrings/ipvslb.gpg" in sources.content_string
    assert host.file("/etc/apt/keyrings/ipvslb.gpg").exists
    assert "10.0.2.2" in host.check_output("apt-cache policy ipvslb")


def test_service_enabled_and_running(host):
    service = host.service("ipvslb")
    assert service.is_enabled
    assert service.is_running
    assert main_pid(host) > 0


def test_daemon_runs_at_the_configured_nice_value(host):
    stat = host.file(f"/proc/{main_pid(host)}/stat").content_string
    # Fields after the parenthesised command name start at field 3; nice is field 19.
    assert int(stat.rsplit(")", 1)[1].split()[16]) == inventory_vars().get("ipvslb_nice", -10)


def test_config_rendered_from_inventory(host):
    variables = inventory_vars()
    config = host.file(CONFIG)
    assert config.user == "root" and config.mode == 0o644
    text = config.content_string
    assert text.startswith("#\n# Ansible managed\n#\n")
    rendered = yaml.safe_load(text)
    assert rendered["services"] == expected_services(variables)
    assert list(rendered["services"][0]) == [k for k in SERVICE_KEYS if k in rendered["services"][0]]
    assert rendered["settings"]["log_level"] == variables["ipvslb_log_level"]
    assert rendered["settings"]["nice"] == -10
    assert rendered["settings"]["vip_interface"] == "ipvslb0"
    assert rendered["settings"]["sysctls"]["conn_reuse_mode"] == "auto"
    assert rendered["settings"]["tracer"] == {"connection_capacity": 65536, "ring_buffer_pages": 64,
                                              "report_closed": False, "wakeup_interval": 0.1,
                                              "sample_interval": 0.02}
    assert host.run(f"ipvslb check-config {CONFIG}").rc == 0


def test_ipvs_matches_inventory(host):
    expected = expected_ipvs(expected_services(inventory_vars()))
    assert wait_for("IPVS to equal the inventory", lambda: ipvsadm(host) == expected, timeout=30)
    # The VIPs are on the daemon's dummy interface.
    addresses = host.check_output("ip -o addr show dev ipvslb0")
    for service in inventory_vars()["ipvslb_services"]:
        assert f" {service['vip']}/" in addresses


def test_backend_failure_is_quarantined(host):
    """Backend 2 of `web` stops (its port refuses connects): the daemon quarantines it
    (weight 0 in IPVS), clients keep being served, and it comes back after it recovers."""
    endpoint = "10.77.2.2:8080"
    assert connect(host, "10.255.0.1", 80, 20) == (20, 0)
    host.check_output("systemctl stop molecule-backend@2.service")
    try:
        ok, failed = connect(host, "10.255.0.1", 80, 60)
        print(f"after {endpoint} stopped: {ok} connects answered, {failed} failed")
        wait_for(f"{endpoint} quarantined",
                 lambda: backend_status(host, endpoint)["weight"] == 0, timeout=30, interval=0.5)
        print(host.check_output("ipvslb status"))
        assert ipvsadm(host)["TCP 10.255.0.1:80"]["backends"][endpoint] == ("Masq", 0)
        assert backend_status(host, endpoint)["state"] != "healthy"
        assert connect(host, "10.255.0.1", 80, 30) == (30, 0)
    finally:
        host.check_output("systemctl start molecule-backend@2.service")
    # Re-admission: probes succeed, slow start ramps to the configured weight again.
    wait_for(f"{endpoint} re-admitted at weight 1",
             lambda: ipvsadm(host)["TCP 10.255.0.1:80"]["backends"][endpoint] == ("Masq", 1), timeout=90)


def test_changed_inventory_reloads_without_restart(host, tmp_path):
    """Reconverge with a changed inventory: the role reloads the daemon (same PID, no
    restart) and IPVS follows the new inventory."""
    inventory = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    changed_inventory = tmp_path / "inventory"
    shutil.copytree(inventory, changed_inventory, symlinks=False)
    variables = inventory_vars()
    variables.update(yaml.safe_load((COMMON / "changed" / "group_vars" / "all.yml").read_text()))
    (changed_inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(variables, sort_keys=False))

    pid, restarts = main_pid(host), n_restarts(host)
    since = host.check_output("date +%s")
    run = subprocess.run(["ansible-playbook", "-i", str(changed_inventory), str(COMMON / "converge.yml")],
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"})
    print(run.stdout[-6000:], run.stderr[-3000:])
    assert run.returncode == 0
    assert re.search(r"RUNNING HANDLER \[ipvslb\.ipvslb\.ipvslb : Reload ipvslb\]", run.stdout)
    assert re.search(r"changed: \[[^\]]+\]",
                     run.stdout.split("TASK [ipvslb.ipvslb.ipvslb : Configure | Render the configuration]")[1])

    expected = expected_services(variables)
    assert yaml.safe_load(host.file(CONFIG).content_string)["services"] == expected
    wait_for("the reload in the journal", lambda: re.search(
        rf"reloaded {CONFIG}: {len(expected)} services",
        host.check_output(f"journalctl -u ipvslb --no-pager --since @{since}")), timeout=30)
    wait_for("IPVS to equal the changed inventory", lambda: ipvsadm(host) == expected_ipvs(expected), timeout=30)
    assert main_pid(host) == pid, "the daemon was restarted, not reloaded"
    assert n_restarts(host) == restarts
    assert host.service("ipvslb").is_running
