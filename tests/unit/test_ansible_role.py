"""The Ansible role against docs/configuration.md and the daemon: every setting has a role
variable with the daemon's default, every key of services[] and health is an argument, and
the role's template renders a file the daemon reads back as the role's variables say."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jinja2
import pytest
import yaml

from ipvslb import config, model

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "ipvslb"
DOCS = ROOT / "docs" / "configuration.md"

# docs section -> prefix of its role variables (defaults/main.yml says the same).
SECTIONS = {"settings": "ipvslb_", "settings.sysctls": "ipvslb_sysctl_", "settings.tracer": "ipvslb_tracer_"}


def doc_table(section: str) -> list[str]:
    """Keys (first column) of the table under the heading `section` in docs/configuration.md."""
    text = DOCS.read_text()
    heading = re.search(rf"^#+ `{re.escape(section)}`\n", text, re.M)
    assert heading, f"no section `{section}` in {DOCS.name}"
    keys = []
    for line in text[heading.end():].splitlines():
        if line.startswith("#"):
            break
        row = re.match(r"\| `([a-z_]+)` \|", line)
        if row:
            keys.append(row.group(1))
    assert keys, f"no table under `{section}`"
    return keys


def documented_settings() -> dict[str, str]:
    """Every leaf setting as `section.key` -> the role variable that must set it."""
    result = {}
    for section, prefix in SECTIONS.items():
        for key in doc_table(section):
            if f"{section}.{key}" in SECTIONS:  # a sub-mapping, listed in its own table
                continue
            result[f"{section}.{key}"] = prefix + key
    return result


def role_defaults() -> dict:
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def role_options() -> dict:
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    return specs["argument_specs"]["main"]["options"]


def daemon_defaults() -> dict[str, object]:
    """`section.key` -> the daemon's default, from parsing a file without settings."""
    settings = dataclasses.asdict(config.parse("services: []").settings)
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"settings.{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[f"settings.{key}"] = value
    return flat


def test_every_documented_setting_has_a_role_variable_with_the_daemon_default():
    defaults, options, daemon = role_defaults(), role_options(), daemon_defaults()
    documented = documented_settings()
    assert set(documented) == set(daemon), "docs/configuration.md and the daemon list different settings"
    for setting, variable in documented.items():
        assert variable in defaults, f"{setting}: no {variable} in defaults/main.yml"
        assert variable in options, f"{setting}: no {variable} in meta/argument_specs.yml"
        assert defaults[variable] == daemon[setting], f"{variable}: role default differs from the daemon's"
        assert options[variable]["default"] == defaults[variable], f"{variable}: argument_specs default differs"
        assert f"C({setting})" in json.dumps(options[variable]["description"]), \
            f"{variable}: its description does not name C({setting})"


def test_every_settings_variable_of_the_role_is_documented():
    documented = set(documented_settings().values())
    named = {name for name, spec in role_options().items()
             if "C(settings." in json.dumps(spec.get("description", ""))}
    assert named == documented


def test_service_keys_match_the_docs():
    service = role_options()["ipvslb_services"]["options"]
    assert list(service) == doc_table("services")
    # The template's key order, which the role keeps in vars/main.yml.
    order = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["_ipvslb_service_keys"]
    assert order == doc_table("services")


def test_health_options_are_the_daemons_health_keys():
    """Ansible refuses a key that argument_specs does not list, the daemon one it does not
    know: both lists must be the daemon's."""
    options = role_options()
    daemon = {field.name for field in dataclasses.fields(model.HealthSettings)}
    assert set(options["ipvslb_services"]["options"]["health"]["options"]) == daemon
    assert set(options["ipvslb_health_defaults"]["options"]) == daemon


def render(variables: dict) -> str:
    """templates/config.yaml.j2 with the few Ansible filters it uses."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE / "templates"), undefined=jinja2.StrictUndefined)
    env.filters.update(
        to_json=json.dumps,
        bool=lambda v: v if isinstance(v, bool) else str(v).lower() in ("true", "yes", "on", "1"),
        comment=lambda text: "#\n# " + text + "\n#",
        combine=lambda a, b: {**a, **b},
        difference=lambda a, b: [x for x in a if x not in b],
    )
    context = {**role_defaults(), **yaml.safe_load((ROLE / "vars" / "main.yml").read_text()),
               "ansible_managed": "Ansible managed", **variables}
    return env.get_template("config.yaml.j2").render(context)


@pytest.mark.parametrize("nice", [-10, 5, None])
def test_the_rendered_defaults_are_the_daemons(nice):
    # health: a service's own key and one from ipvslb_health_defaults, merged.
    services = [{"name": "api", "vip": "10.255.0.1", "port": 443, "backends": ["10.0.1.11:8443"],
                 "health": {"rise": 3}}]
    parsed = config.parse(render({"ipvslb_nice": nice, "ipvslb_services": services,
                                  "ipvslb_health_defaults": {"probe_backoff_max": 10.0}}))
    expected = config.parse("services: []").settings
    assert parsed.settings == dataclasses.replace(expected, nice=nice)
    (api,) = parsed.services
    assert (api.health.rise, api.health.probe_backoff_max) == (3, 10.0)


def test_a_changed_verify_interval_reaches_the_file():
    parsed = config.parse(render({"ipvslb_ipvs_verify_interval": 120, "ipvslb_services": []}))
    assert parsed.settings.ipvs_verify_interval == 120.0


def test_a_notify_command_reaches_the_file_as_an_argv():
    argv = ["/usr/local/bin/page", "--text", "backend's state: $IPVSLB_NEW_STATE"]
    settings = config.parse(render({"ipvslb_notify_command": argv, "ipvslb_notify_timeout": 2,
                                    "ipvslb_notify_concurrency": 1, "ipvslb_services": []})).settings
    assert (settings.notify_command, settings.notify_timeout, settings.notify_concurrency) == (tuple(argv), 2.0, 1)


def test_a_binary_udp_probe_payload_survives_the_template():
    payload = "\x00\x01ping\xff"
    services = [{"name": "dns", "protocol": "udp", "vip": "10.255.0.2", "port": 5353,
                 "backends": ["10.0.2.21"], "health": {"udp_probe_payload": payload, "udp_probe_expect": "pong"}}]
    (dns,) = config.parse(render({"ipvslb_services": services})).services
    assert (dns.health.udp_probe_payload, dns.health.udp_probe_expect) == (payload, "pong")
