"""The bash completion packaging/gen-manpages writes, run in bash: it offers the parser's
commands and, per command, exactly that command's options, and files where a path goes."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from ipvslb.cli import build_parser
from tests.unit.test_manpages import gen

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
SCRIPT = gen.generate()["ipvslb.bash-completion"]


def complete(words: list[str], cwd=None) -> list[str]:
    """What bash offers for the last of `words` (the word being completed)."""
    quoted = " ".join("'" + w + "'" for w in ["ipvslb", *words])
    run = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                          f'{SCRIPT}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words)}; _ipvslb; '
                          'printf "%s\\n" "${COMPREPLY[@]}"'],
                         capture_output=True, text=True, cwd=cwd, check=True)
    return [line for line in run.stdout.splitlines() if line]


def test_commands_and_top_level_options():
    commands = [name for name, _, _ in gen._commands(build_parser())]
    assert complete([""]) == [*commands, "-h", "--help", "--version"]
    assert complete(["st"]) == ["status"]
    assert complete(["check"]) == ["check-config"]


@pytest.mark.parametrize("command", [name for name, _, _ in gen._commands(build_parser())])
def test_each_command_offers_exactly_its_options(command):
    sub = dict((name, p) for name, _, p in gen._commands(build_parser()))[command]
    options = [o for a in sub._actions for o in a.option_strings]
    assert complete([command, "-"]) == options
    assert complete(["--help", command, "--"]) == [o for o in options if o.startswith("--")]


def test_paths_complete_to_files(tmp_path):
    (tmp_path / "config.yaml").write_text("")
    (tmp_path / "other").write_text("")
    assert complete(["status", "--config", "con"], cwd=tmp_path) == ["config.yaml"]
    assert complete(["status", "--json", "--socket", "o"], cwd=tmp_path) == ["other"]
    assert complete(["check-config", "c"], cwd=tmp_path) == ["config.yaml"]
    assert complete(["events", "--vip", "c"], cwd=tmp_path) == []  # an address, not a file
