"""ipvslb(8) and ipvslb.yaml(5) as packaging/gen-manpages writes them at package build time:
every command, option and configuration key is in them, they render without groff warnings,
and both packages build and install them."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ipvslb import __version__, model
from ipvslb.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    loader = importlib.machinery.SourceFileLoader("gen_manpages", str(ROOT / "packaging" / "gen-manpages"))
    spec = importlib.util.spec_from_loader("gen_manpages", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gen = load_generator()
PAGES = gen.generate()


def _plain(roff: str) -> str:
    return roff.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "")


def test_ipvslb_8_has_every_command_and_option_of_the_parser():
    page = PAGES["ipvslb.8"]
    assert page.startswith(f'.TH IPVSLB 8 "" "ipvslb {__version__}"')
    text = _plain(page)
    commands = gen._commands(build_parser())
    assert {name for name, _, _ in commands} >= {"run", "check-config", "status", "events"}
    for name, _help, sub in commands:
        assert f".SS {name}\n" in page
        assert f"ipvslb {name}" in text  # its synopsis line
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # every command has it: DESCRIPTION says so once
            for option in action.option_strings:
                assert option in text, (name, option)
            if action.help:
                assert action.help in text, (name, action.help)


def test_ipvslb_8_takes_each_commands_section_of_docs_commands_md():
    text = _plain(PAGES["ipvslb.8"])
    # One sentence from each command's section in docs/commands.md.
    assert "Validates a configuration file and prints every error at once" in text
    assert "reads the weights" in text and "already in the kernel" in text
    assert "Asks the running daemon on its root-only unix socket" in text


def test_ipvslb_yaml_5_has_every_settings_key():
    text = _plain(PAGES["ipvslb.yaml.5"])
    keys = [f.name for cls in (model.Settings, model.Sysctls, model.TracerSettings, model.HealthSettings)
            for f in dataclasses.fields(cls)]
    assert len(keys) > 20
    missing = [k for k in keys if k not in text]
    assert missing == []


def test_markdown_conversion():
    lines = gen.markdown_to_man(
        "## A `b`\n\nText with `--opt` and **strong `code` still** then *it*.\n.dot line\n\n"
        "| key | type |\n|---|---|\n| `k-1` | int |\n\n- one\n  two\n- three\n\n```\n-x \\y\n```\n")
    assert lines == [
        ".SH A \\fBB\\fR",
        ".PP", "Text with \\fB\\-\\-opt\\fR and \\fBstrong \\fBcode still\\fR then \\fIit\\fR.", "\\&.dot line",
        ".TP", "\\fBk\\-1\\fR", "type: int",
        ".IP \\(bu 2", "one", "two", ".IP \\(bu 2", "three",
        ".PP", ".RS 4", ".nf", "\\-x \\ey", ".fi", ".RE"]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("name", ["ipvslb.8", "ipvslb.yaml.5"])
def test_the_pages_render_without_warnings(tmp_path, name):
    path = tmp_path / name
    path.write_text(PAGES[name])
    run = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert run.returncode == 0 and run.stderr == ""


def test_the_generator_writes_what_the_packages_install(tmp_path):
    assert gen.main([str(tmp_path), "--version", "9.9"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipvslb.8", "ipvslb.bash-completion", "ipvslb.yaml.5"]
    assert '"ipvslb 9.9"' in (tmp_path / "ipvslb.8").read_text()


@pytest.mark.parametrize("recipe", ["deb/debian/rules", "rpm/ipvslb.spec"])
def test_both_packages_generate_and_install_them(recipe):
    path = ROOT / "packaging" / recipe
    if not path.exists():  # the RPM's source tarball has no debian/ directory
        pytest.skip(f"{recipe} is not in this tree")
    text = path.read_text()
    assert "packaging/gen-manpages" in text and "help2man" not in text
    for installed in ("man8/ipvslb.8", "man5/ipvslb.yaml.5", "bash-completion/completions/ipvslb"):
        assert installed in text, installed
