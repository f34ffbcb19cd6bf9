"""YAML configuration -> the typed model in `ipvslb.model`; the only module that parses it.

Every problem is collected before anything is raised, so one `ipvslb check-config` run
shows them all, one per line:

    <file>: <path>: <problem>: got <value>, expected <what>

with paths such as `services[1].backends[2].port`. `load` and `parse` raise nothing but
`ConfigError`, whatever the input (tests/unit/test_config.py fuzzes that), and within a
bounded time and memory: `load` reads only regular files of at most MAX_FILE_BYTES, YAML
integers beyond 64 bits are refused before Python converts them.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import reprlib
import secrets
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from ipvslb import model

FORWARDING = ("masq", "route", "tunnel")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Durations are capped so that timer arithmetic in the daemon can never overflow.
MAX_DURATION = 86400.0
# The pure-Python YAML parser (libyaml's crashes on deep nesting) takes 9 s and 220 MB for
# a file of this size, 25 000 services (x86-64 development host); 50 MB took 4 minutes and
# 5.4 GB, stalling a reload all that time.
MAX_FILE_BYTES = 2 << 20
# Error lines shown; the rest are counted. One wrong key repeated in a generated file of
# thousands of services should not flood the journal.
MAX_MESSAGES = 50
# Names end up in log lines, metrics labels and status tables.
MAX_NAME_CHARS = 64
# A UDP probe is one datagram; 512 bytes fits any path without fragments.
MAX_PROBE_BYTES = 512
# Arguments of an exec probe's command.
MAX_ARGV = 64
# Characters of an integer literal; 64 bits take at most 67 ("-0b" and 64 digits). Longer
# ones are refused before conversion, which is slow (or a ValueError) for thousands of digits.
MAX_INTEGER_CHARS = 100
# What the packaged unit (packaging/ipvslb.service) lets the daemon write: its
# StateDirectory= and RuntimeDirectory= under ProtectSystem=strict. Its /tmp is private.
UNIT_WRITABLE = ("/var/lib/ipvslb", "/run/ipvslb")

_INVALID = object()  # a check's result when it has reported an error
_NOTHING = object()  # "no value": nothing to show for a missing key, no default

_repr = reprlib.Repr()
# YAML aliases can build huge or self-referencing structures; keep quoted values short.
_repr.maxstring = _repr.maxother = 60
_repr.maxlevel = 2


class ConfigError(Exception):
    """The configuration is unusable; `messages` holds one line per problem."""

    def __init__(self, messages: list[str]):
        super().__init__("\n".join(messages))
        self.messages = messages


def load(path: str | os.PathLike) -> model.Config:
    source = os.fsdecode(path)
    data = _read_file(source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise ConfigError([f"{source}: not UTF-8 text: byte {byte:#04x} at offset {err.start}"]) from None
    return parse(text, source)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _read_file(source: str) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_FILE_BYTES. Opened without
    blocking: opening a FIFO for reading would otherwise wait for a writer."""
    def fail(problem: str) -> ConfigError:
        return ConfigError([f"{source}: {problem}"])

    def check_kind(mode: int) -> None:
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "another kind of file")
            raise fail(f"not a regular file: got {kind}, expected a YAML file")

    try:
        # stat first: a socket cannot be opened at all (ENXIO), which would hide what it is.
        check_kind(os.stat(source).st_mode)
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise fail(f"cannot read: {getattr(err, 'strerror', None) or err}") from None
    try:
        info = os.fstat(fd)
        check_kind(info.st_mode)  # again: the path may have changed since stat
        if info.st_size > MAX_FILE_BYTES:
            raise fail(f"file too large: got {info.st_size} bytes, expected at most {MAX_FILE_BYTES} "
                       f"({MAX_FILE_BYTES >> 20} MiB)")
        with os.fdopen(os.dup(fd), "rb") as f:
            # One byte more than allowed: a file that grew since fstat is caught too.
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise fail(f"cannot read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise fail(f"file too large: got more than {MAX_FILE_BYTES} bytes, expected at most {MAX_FILE_BYTES} "
                   f"({MAX_FILE_BYTES >> 20} MiB)")
    return data


def parse(text: str, source: str = "<string>") -> model.Config:
    report = _Report(source)
    config = _config(_read_yaml(text, report), report)
    if report.messages:
        raise ConfigError(_capped(report.messages, source))
    global _reusable, _reusable_by_first_line, _last_text, _last_entries
    by_first_line: dict[str, list[str]] = {}
    for entry in report.checked_services:
        by_first_line.setdefault(entry.partition("\n")[0], []).append(entry)
    _reusable, _reusable_by_first_line = report.checked_services, by_first_line
    entries = _entries_at(text, report.service_texts, report.services_line)
    _last_text, _last_entries = (text, entries) if entries else ("", [])
    assert config is not None  # no error messages: every part was valid
    return config


def _capped(messages: list[str], source: str) -> list[str]:
    if len(messages) <= MAX_MESSAGES:
        return messages
    rest = len(messages) - MAX_MESSAGES
    return [*messages[:MAX_MESSAGES], f"{source}: {rest} more problem{'s' if rest > 1 else ''} not shown"]


def unit_warnings(cfg: model.Config, source: str = "<string>") -> list[str]:
    """Paths the packaged unit does not let the daemon write: valid, but `ipvslb run` under
    ipvslb.service would fail to create them (or, under /tmp, hide them in its private /tmp)."""
    lines = []
    # An unset control_socket lies beside status_socket, whose warning covers it.
    paths = {"state_dir": cfg.settings.state_dir, "status_socket": cfg.settings.status_socket,
             "control_socket": cfg.settings.control_socket}
    for key, path in paths.items():
        if path is None:
            continue
        path = os.path.normpath(path)
        if not any(path == top or path.startswith(top + "/") for top in UNIT_WRITABLE):
            lines.append(f"{source}: settings.{key}: warning: not writable under the packaged ipvslb.service: "
                         f"got {_repr.repr(path)}, expected a path below {' or '.join(UNIT_WRITABLE)} "
                         f"(or add ReadWritePaths= in a drop-in)")
    return lines


# --- reporting -------------------------------------------------------------------------

class _Report:
    def __init__(self, source: str):
        self.source = source
        self.messages: list[str] = []
        # Per entry of `services`, its text (None: not reusable); entry text -> checked.
        self.service_texts: list[str | None] | None = None
        self.services_line = -1  # the line of the first entry of `services`
        self.checked_services: dict[str, _Reused] = {}

    def error(self, path: str, problem: str, expected: str, got: Any = _NOTHING) -> None:
        shown = "" if got is _NOTHING else f"got {_repr.repr(got)}, "
        self.note(f"{path}: {problem}: {shown}expected {expected}")

    def note(self, text: str) -> None:
        self.messages.append(f"{self.source}: {text}")


class _Invalid(Exception):
    """Raised by scalar checks with the problem; the caller turns it into a report line."""


def _join(path: str, key: Any) -> str:
    # Quote keys that could be mistaken for path syntax or hide in whitespace.
    plain = isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key)
    name = key if plain else _repr.repr(key)
    return f"{path}.{name}" if path else name


# --- YAML ------------------------------------------------------------------------------

# The loaders' base, as mypy sees it: _Checks is mixed into PyYAML's loaders.
_LoaderBase = yaml.SafeLoader if TYPE_CHECKING else object


class _Checks(_LoaderBase):  # type: ignore[misc,valid-type]
    """What both loaders add to PyYAML's safe loading: duplicate mapping keys noted, which
    PyYAML would silently let the last one win (a service with two `port:` lines), and the
    node under construction remembered, so that a failed conversion can say where it was."""

    duplicates: list[str]
    current: yaml.Node | None
    # The text being composed, when the texts of entries of `services` are kept for
    # reuse; the reused entries its placeholders stand for, in order (see _shortened); the
    # text of each entry (None: not reusable).
    reuse_text: str | None = None
    reused_entries: list[list[str]] = []
    service_texts: list[str | None] | None = None
    services_line = -1

    def compose_document(self):
        self.get_event()  # DOCUMENT-START, as Composer.compose_document
        if self.reuse_text is not None and self.check_event(yaml.MappingStartEvent):
            node = self._compose_root()
        else:
            node = self.compose_node(None, None)
        self.get_event()  # DOCUMENT-END
        self.anchors = {}
        return node

    def _compose_root(self) -> yaml.MappingNode:
        """Composer.compose_mapping_node for the top level (no anchor, no tag: reuse_text
        has neither), with `services` composed by _compose_services."""
        start = self.get_event()
        node = yaml.MappingNode(self.resolve(yaml.MappingNode, None, start.implicit), [], start.start_mark, None,
                                flow_style=start.flow_style)
        while not self.check_event(yaml.MappingEndEvent):
            key = self.compose_node(node, None)
            if (isinstance(key, yaml.ScalarNode) and key.value == "services" and self.service_texts is None
                    and self.check_event(yaml.SequenceStartEvent)):
                value = self._compose_services(node, key)
            else:
                value = self.compose_node(node, key)
            node.value.append((key, value))
        node.end_mark = self.get_event().end_mark
        self._note_duplicates(node)
        return node

    def _compose_services(self, parent: yaml.Node, index: yaml.Node) -> yaml.SequenceNode:
        """The `services` sequence: a placeholder entry becomes a _ReusedNode for each entry
        of the run it stands for; any other entry is composed, and its text kept if it is a block
        entry (`-` first on its line)."""
        text, reused = self.reuse_text or "", self.reused_entries
        start = self.get_event()
        node = yaml.SequenceNode(self.resolve(yaml.SequenceNode, None, start.implicit), [], start.start_mark, None,
                                 flow_style=start.flow_style)
        texts: list[str | None] = []
        self.service_texts = texts
        used = 0
        while not self.check_event(yaml.SequenceEndEvent):
            event = self.peek_event()
            if not node.value:
                self.services_line = event.start_mark.line
            if isinstance(event, yaml.ScalarEvent) and event.value.startswith(_PLACEHOLDER):
                self.get_event()
                if used == len(reused) or event.value != f"{_PLACEHOLDER}{used}":
                    raise _ReuseMismatch()
                texts += reused[used]
                node.value += [_ReusedNode(event.start_mark, event.end_mark, _reusable[t]) for t in reused[used]]
                used += 1
                continue
            begin = event.start_mark.index
            line = text.rfind("\n", 0, begin) + 1
            entry = self.compose_node(node, len(node.value))
            block = not start.flow_style and _ENTRY_START.fullmatch(text, line, begin)
            texts.append(text[line:entry.end_mark.index].rstrip(_BLANK) if block else None)
            node.value.append(entry)
        if used != len(reused):
            raise _ReuseMismatch()  # a placeholder ended up elsewhere: the entry was not one
        node.end_mark = self.get_event().end_mark
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        self._note_duplicates(node)
        return node

    def _note_duplicates(self, node: yaml.MappingNode) -> None:
        first: dict[tuple[str, str], yaml.Mark] = {}
        for key, _ in node.value:
            # Merge keys (`<<`) may repeat and are meant to be overridden.
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            seen = first.setdefault((key.tag, key.value), key.start_mark)
            if seen is not key.start_mark:
                self.duplicates.append(
                    f"{_where(key.start_mark)}: duplicate key: got {_repr.repr(key.value)}, "
                    f"expected each key once in a mapping (first at line {seen.line + 1})")

    def construct_object(self, node, deep=False):
        if isinstance(node, _ReusedNode):
            return node.reused
        self.current = node
        return super().construct_object(node, deep)

    def construct_yaml_int(self, node):
        # Checked on the text first: int() of thousands of digits is slow or a ValueError,
        # and the repr of a huge int raises one.
        if len(node.value) > MAX_INTEGER_CHARS:
            return _HugeInteger(node.value)
        value = super().construct_yaml_int(node)
        return _HugeInteger(node.value) if value.bit_length() > 64 else value


class _Loader(_Checks, yaml.SafeLoader):
    """PyYAML's own parser, in Python: the one whose error messages `check-config` shows."""

    def __init__(self, text: str):
        super().__init__(text)
        self.duplicates, self.current = [], None


_Loader.add_constructor("tag:yaml.org,2002:int", _Checks.construct_yaml_int)

if getattr(yaml, "__with_libyaml__", False):
    from yaml.cyaml import CParser

    class _FastLoader(_Checks, yaml.composer.Composer, CParser, yaml.constructor.SafeConstructor,
                      yaml.resolver.Resolver):
        """libyaml's parser for the events (six times faster than PyYAML's: 200 services
        parse in 35 ms instead of 170 on an x86-64 host, and a reload parses the whole file),
        composed into nodes by PyYAML's Composer in Python. Not libyaml's composer: it
        recurses in C and crashes on deep nesting, where Python's raises RecursionError.
        Libyaml's own parser keeps its nesting on heap stacks."""

        def __init__(self, text: str):
            CParser.__init__(self, text)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self.duplicates, self.current = [], None

    _FastLoader.add_constructor("tag:yaml.org,2002:int", _Checks.construct_yaml_int)
else:
    _FastLoader = None  # type: ignore[misc,assignment]


@dataclasses.dataclass(frozen=True)
class _HugeInteger:
    """An integer literal beyond 64 bits, kept as text so that checks can name it."""

    text: str

    def __repr__(self) -> str:
        shown = self.text if len(self.text) <= 40 else f"{self.text[:20]}…{self.text[-8:]}"
        return f"{shown} ({len(self.text)} characters)" if shown != self.text else shown


def _where(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


# --- services reused between parses ----------------------------------------------------
# A reload re-reads the whole file, but mostly for one changed service. An entry of
# `services` whose text is the same as in the last good parse is neither parsed nor
# checked again: _shortened replaces runs of such entries with one placeholder entry on the
# same lines, and their checked values and model.Service are reused, the very objects, so
# that the daemon's reload finds them unchanged by identity too. The placeholders must
# come back, in order, as entries of `services`, else the file is parsed in full: that
# holds only where the replaced text was whole entries. The text of an entry decides its
# value only when nothing in it refers elsewhere: files with anchors, aliases, tags or
# block scalars (`&`, `*`, `!`, `|`, `>` anywhere, comments included) and non-ASCII files
# (whose marks libyaml counts in bytes) are parsed in full.


class _Reused:
    __slots__ = ("values", "service")

    def __init__(self, values: dict[str, Any], service: model.Service):
        self.values, self.service = values, service


class _ReusedNode(yaml.ScalarNode):
    """Stands for an entry found in `_reusable`: constructs to its _Reused."""

    def __init__(self, start_mark, end_mark, reused: _Reused):
        super().__init__("tag:ipvslb,reused", "", start_mark, end_mark)
        self.reused = reused


class _ReuseMismatch(Exception):
    """A placeholder did not come back as an entry of `services`."""


# Entry text (from its line's start to its end) -> the checked entry, of the last good
# parse; and the entries' texts by their first line, to find them in the next text.
_reusable: dict[str, _Reused] = {}
_reusable_by_first_line: dict[str, list[str]] = {}
# The text of the last good parse and where its entries of `services` are in it, in
# order: (start, end, text). The part of the next text that is the same at its start, and
# at its end, holds those entries where they were, found without a look at each line.
_last_text = ""
_last_entries: list[tuple[int, int, str]] = []
# A plain scalar no file holds: its tail is random per process.
_PLACEHOLDER = f"ipvslb-reused-{secrets.token_hex(8)}-"
# Trailing blanks are not part of an entry (block scalars, whose kept trailing newlines
# would be, are never reused: see _read_yaml).
_BLANK = " \t\r\n"
# What comes before a block entry's first token on its line.
_ENTRY_START = re.compile(r" *-[ \t]+")
# What may follow an entry: blanks to the end of its last line, then blank and comment lines.
_TRAILER = re.compile(r"[ \t\r]*(?:\n[ \t\r]*(?:#[^\n]*)?)*")


def _ends_entry(text: str, at: int, first_line: str) -> bool:
    """Whether an entry of a block sequence whose first line is `first_line` ends at `at`:
    only blanks and comment lines follow, up to the end or to a line indented no deeper
    than its `-` (which closes every block inside the entry). A cheap first test: where it
    errs, the placeholder does not come back as an entry and the file is parsed in full."""
    dash = len(first_line) - len(first_line.lstrip(" "))
    if text.startswith("\n", at) and text.startswith(first_line[:dash + 1], at + 1):
        return True  # the common case: the next line is the next entry, its `-` in the same column
    after = _TRAILER.match(text, at).end()  # type: ignore[union-attr]  # matches the empty string
    if after == len(text):
        return True
    line = text.rfind("\n", 0, after) + 1
    return line > at and after - line <= dash


def _entries_at(text: str, texts: list[str | None] | None, line: int) -> list[tuple[int, int, str]]:
    """Where the entries of `services` with these texts are in `text`, in order; [] when
    that is not certain: an entry not reusable, or one not where a parse put it (the first
    on `line`, where its node started, each next one after only blank and comment lines)."""
    found: list[tuple[int, int, str]] = []
    at = 0
    for entry in texts or ():
        if entry is None:
            return []
        if found and text.startswith("\n", at) and text.startswith(entry, at + 1):
            at += 1 + len(entry)  # the common case: right on the next line
            found.append((at - len(entry), at, entry))
            continue
        start = text.find(entry, at)
        if start < 0:
            return []
        if found:
            indent = len(entry) - len(entry.lstrip(" "))
            if _TRAILER.match(text, at).end() != start + indent:  # type: ignore[union-attr]
                return []
        elif text.count("\n", 0, start) != line or (start and text[start - 1] != "\n"):
            return []
        at = start + len(entry)
        found.append((start, at, entry))
    return found


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix, by bisection: each step is one comparison
    in C, where a loop over characters would be one Python step each."""
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; a[:high] != b[:high] unless equal
    if a[:high] == b[:high]:
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    return low


def _common_suffix(a: str, b: str, most: int) -> int:
    """The length of the longest common suffix, at most `most`."""
    return min(most, _common_prefix(a[::-1], b[::-1]))


def _shortened(text: str) -> tuple[str, list[list[str]]]:
    """`text` with entries found in _reusable replaced by placeholder entries, each on
    the first line of what it replaced and followed by as many line breaks as that had (so
    every other line and column stays where it is), and the runs of entries replaced, in
    order. A run is the entries of the last good parse in the part both texts start with,
    those in the part both end with, or one entry elsewhere, found by its first line."""
    old, entries, size = _last_text, _last_entries, len(text)
    prefix = _common_prefix(old, text)
    lead = 0  # entries[:lead] stay where they were, at the start
    while lead < len(entries) and entries[lead][1] <= prefix:
        lead += 1
    while lead and not _ends_entry(text, entries[lead - 1][1], _first_line(entries[lead - 1][2])):
        lead -= 1
    middle = entries[lead - 1][1] if lead else 0
    # (The common end may overlap the common start: the runs found in them do not.)
    suffix = _common_suffix(old, text, min(len(old), size) - middle)
    shift = size - len(old)
    trail = len(entries)  # entries[trail:] stay as they were, at the end, shifted
    while trail > lead and entries[trail - 1][0] >= len(old) - suffix and entries[trail - 1][0] + shift >= middle:
        trail -= 1
    while trail < len(entries) and entries[trail][0] + shift and text[entries[trail][0] + shift - 1] != "\n":
        trail += 1
    if trail < len(entries) and not _ends_entry(text, entries[-1][1] + shift, _first_line(entries[-1][2])):
        trail = len(entries)
    middle_end = entries[trail][0] + shift if trail < len(entries) else size

    spans: list[tuple[int, int, list[str]]] = []  # (start, end, the run replaced)
    if lead:
        spans.append((entries[0][0], middle, [e[2] for e in entries[:lead]]))
    by_first_line = _reusable_by_first_line
    at = 0
    if lead:  # the line after the run's last
        at = text.find("\n", middle) + 1 or size
    while at < middle_end:
        end = text.find("\n", at)
        end = size if end < 0 else end
        first_line = text[at:end]
        candidates = by_first_line.get(first_line)
        entry = next((t for t in candidates if at + len(t) <= middle_end and text.startswith(t, at)
                      and _ends_entry(text, at + len(t), first_line)), None) if candidates else None
        if entry is not None:
            spans.append((at, at + len(entry), [entry]))
            end = text.find("\n", at + len(entry))
            end = size if end < 0 else end
        at = end + 1
    if trail < len(entries):
        spans.append((middle_end, entries[-1][1] + shift, [e[2] for e in entries[trail:]]))

    parts: list[str] = []
    done = 0
    for number, (start, end, _run) in enumerate(spans):
        dash = _ENTRY_START.match(text, start)  # kept entries all start so
        assert dash is not None
        parts += [text[done:dash.end()], f"{_PLACEHOLDER}{number}", "\n" * text.count("\n", start, end)]
        done = end
    parts.append(text[done:])
    return "".join(parts), [run for _, _, run in spans]


def _first_line(entry: str) -> str:
    return entry.partition("\n")[0]


def _read_yaml(text: str, report: _Report) -> Any:
    reusable = text.isascii() and not any(c in text for c in "&*!|>")
    if reusable and _reusable:
        short, found = _shortened(text)
        if found:
            try:
                # (The replaced entries passed the reader's check in the last parse.)
                return _read_yaml_with(_FastLoader if _fast(short) else _Loader, short, report, found)
            except (_ReuseMismatch, ConfigError):
                pass  # parsed in full: errors are worded on the file as it is
    fast = _fast(text)
    if fast:
        try:
            return _read_yaml_with(_FastLoader, text, report, [] if reusable else None)
        except ConfigError:
            pass  # described by PyYAML's parser, as `check-config` always words it
    return _read_yaml_with(_Loader, text, report, [] if reusable else None)


def _fast(text: str) -> bool:
    # Python's reader refuses these characters before parsing; libyaml's does not all.
    return _FastLoader is not None and not yaml.reader.Reader.NON_PRINTABLE.search(text)


def _read_yaml_with(loader_class: type, text: str, report: _Report, reused: list[list[str]] | None) -> Any:
    """The document; with `reused` (not None), `text` has a placeholder for each run of
    entries in it, and the texts of entries are kept."""
    def fail(problem: str) -> ConfigError:
        return ConfigError([f"{report.source}: {problem}"])

    report.service_texts = None
    try:
        loader = loader_class(text)
    except yaml.YAMLError as err:  # ReaderError: a character YAML does not allow
        raise fail(f"not valid YAML: {_one_line(err)}") from None
    if reused is not None:
        loader.reuse_text, loader.reused_entries = text, reused
    try:
        node = loader.get_single_node()
        if reused and loader.service_texts is None:
            raise _ReuseMismatch()  # no `services` took the placeholders
        report.service_texts, report.services_line = loader.service_texts, loader.services_line
        doc = None if node is None else loader.construct_document(node)
    except _ReuseMismatch:
        raise
    except yaml.MarkedYAMLError as err:
        raise fail(_marked_yaml_error(err)) from None
    except RecursionError:
        raise fail("not valid YAML: nested too deeply") from None
    except Exception as err:
        raise fail(_conversion_error(loader.current, err)) from None
    for line in loader.duplicates:
        report.note(line)
    return doc


def _conversion_error(node: yaml.Node | None, err: Exception) -> str:
    """PyYAML's constructors leak ValueError, KeyError, IndexError, AttributeError on
    impossible dates and explicitly tagged scalars (`2024-02-30`, `!!int ''`); only a
    ValueError's text means something to the reader."""
    if node is None:
        return f"not valid YAML: {_one_line(err)}"
    detail = f" ({_one_line(err)})" if isinstance(err, ValueError) else ""
    return f"{_where(node.start_mark)}: not valid YAML: cannot read {_repr.repr(node.value)} as {node.tag}{detail}"


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _marked_yaml_error(err: yaml.MarkedYAMLError) -> str:
    where = f"{_where(err.problem_mark)}: " if err.problem_mark else ""
    parts = [p for p in (err.context, err.problem) if p]
    return f"{where}not valid YAML: {', '.join(parts) or 'syntax error'}"


# --- scalar checks ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Field:
    """How one key is checked: `check(value, path, report)` returns the model value or
    _INVALID after reporting; `expected` describes a valid value for messages."""

    check: Callable[[Any, str, _Report], Any]
    expected: str
    required: bool = False
    # For the few keys whose model field has no default of its own.
    default: Any = _NOTHING

    def needed(self) -> _Field:
        return dataclasses.replace(self, required=True)

    def defaulting(self, value: Any) -> _Field:
        return dataclasses.replace(self, default=value)


def _scalar(expected: str, convert: Callable[[Any], Any]) -> _Field:
    def check(value: Any, path: str, report: _Report) -> Any:
        if isinstance(value, _HugeInteger):
            report.error(path, "integer beyond 64 bits", expected, value)
            return _INVALID
        try:
            return convert(value)
        except _Invalid as bad:
            report.error(path, str(bad), expected, value)
            return _INVALID
    return _Field(check, expected)


def _integer(low: int, high: int | None = None, *, nullable: bool = False) -> _Field:
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    if nullable:
        expected += " or null"

    def convert(value: Any) -> int | None:
        if value is None and nullable:
            return None
        # type() rather than isinstance(): YAML's true/false are bools, and bool is an int.
        if type(value) is not int:
            raise _Invalid("not an integer")
        if value < low or (high is not None and value > high):
            raise _Invalid("out of range")
        return value
    return _scalar(expected, convert)


def _number(*, above: float | None = None, at_least: float | None = None,
            below: float | None = None, at_most: float | None = None) -> _Field:
    given = [(above, ">", float.__gt__), (at_least, ">=", float.__ge__),
             (below, "<", float.__lt__), (at_most, "<=", float.__le__)]
    bounds = [(float(limit), sign, test) for limit, sign, test in given if limit is not None]
    expected = "a number " + " and ".join(f"{sign} {limit:g}" for limit, sign, _ in bounds)

    def convert(value: Any) -> float:
        if type(value) not in (int, float):
            raise _Invalid("not a number")
        try:
            number = float(value)
        except OverflowError:
            raise _Invalid("out of range") from None
        if not math.isfinite(number):
            raise _Invalid("not a finite number")
        if not all(test(number, limit) for limit, _, test in bounds):
            raise _Invalid("out of range")
        return number
    return _scalar(expected, convert)


def _duration() -> _Field:
    field = _number(above=0, at_most=MAX_DURATION)
    return dataclasses.replace(field, expected=f"{field.expected} (seconds)")


def _seconds(**bounds: float) -> _Field:
    field = _number(**bounds)
    return dataclasses.replace(field, expected=f"{field.expected} (seconds)")


def _verify_interval() -> _Field:
    return _seconds(at_least=1, at_most=MAX_DURATION)


def _fraction() -> _Field:
    return _number(above=0, at_most=1)


def _removed(why: str) -> _Field:
    """A key that no longer exists: refused with the reason, so a configuration that relies
    on it is not silently run without it. Absent, it adds nothing to the model."""
    def check(value: Any, path: str, report: _Report) -> Any:
        report.error(path, f"removed: {why}", "the key deleted")
        return _INVALID
    return _Field(check, "the key deleted", default=dataclasses.MISSING)


_CORRELATED_REMOVED = ("quarantines freeze on this host's own evidence (probes to every backend failing "
                       "together, or a probe failing on this host), see docs/health.md")


def _boolean() -> _Field:
    def convert(value: Any) -> bool:
        if type(value) is not bool:
            raise _Invalid("not a boolean")
        return value
    return _scalar("true or false", convert)


def _choice(options: tuple) -> _Field:
    def convert(value: Any) -> Any:
        # Compare types too: True == 1 must not pass for conn_reuse_mode's 1.
        if not any(type(value) is type(o) and value == o for o in options):
            raise _Invalid("unknown value")
        return value
    return _scalar("one of " + ", ".join(map(str, options)), convert)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("not a string")
    return value


def _ip(value: Any) -> model.IPAddress:
    try:
        address = ipaddress.ip_address(_text(value))
    except ValueError:
        raise _Invalid("not an IP address") from None
    if getattr(address, "scope_id", None):
        raise _Invalid("zone index not supported")
    if address.is_unspecified or address.is_multicast:
        raise _Invalid("not a unicast address")
    return address


def _address() -> _Field:
    return _scalar("an IPv4 or IPv6 address such as 10.0.0.1 or fd00::1", _ip)


def _vip_address(value: Any) -> model.IPAddress:
    """A VIP is reached by clients through IPVS on this host: an address that stays on the
    host (loopback), never leaves its link (link-local) or is everyone's (broadcast) is
    not one IPVS can serve as configured."""
    address = _ip(value)
    plain = getattr(address, "ipv4_mapped", None) or address
    if plain.is_loopback:
        raise _Invalid("loopback address")
    if plain.is_link_local:
        raise _Invalid("link-local address")
    if plain == ipaddress.IPv4Address("255.255.255.255"):
        raise _Invalid("broadcast address")
    if plain.is_unspecified or plain.is_multicast:
        raise _Invalid("not a unicast address")
    return address


def _vip() -> _Field:
    return _scalar("a unicast IPv4 or IPv6 address such as 10.0.0.1 or fd00::1, not loopback, "
                   "link-local or broadcast", _vip_address)


def _port() -> _Field:
    return _integer(1, 65535)


def _port_text(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise _Invalid("bad port")
    return int(text)


def _endpoint(text: str) -> tuple[model.IPAddress, int | None]:
    """'10.0.0.1', '10.0.0.1:80', 'fd00::1', '[fd00::1]' or '[fd00::1]:80'. A bare IPv6
    address is all address: its last group is never taken for a port."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _Invalid("not an address")
        return _ip(host), _port_text(rest[1:]) if rest else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return _ip(host), _port_text(port)
    return _ip(text), None


def _metrics_address() -> _Field:
    def convert(value: Any) -> str:
        if _text(value) == "":  # metrics disabled (docs/metrics.md)
            return value
        _, port = _endpoint(value)
        if port is None:
            raise _Invalid("no port")
        return value
    return _scalar("ADDRESS:PORT such as 127.0.0.1:9742 or [::1]:9742, or '' for no metrics", convert)


def _name() -> _Field:
    def convert(value: Any) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", _text(value)):
            raise _Invalid("bad name")
        if len(value) > MAX_NAME_CHARS:
            raise _Invalid("name too long")
        return value
    return _scalar(f"a name of 1 to {MAX_NAME_CHARS} letters, digits, '_', '.' and '-'", convert)


def _interface_name() -> _Field:
    # The kernel's dev_valid_name(): at most IFNAMSIZ-1 bytes, no '/', ':' or space; and no
    # control characters, which the kernel allows but logs and tables would garble.
    def convert(value: Any) -> str:
        text = _text(value)
        if (not re.fullmatch(r"[^/:\s]+", text) or len(text.encode()) > 15
                or text in (".", "..") or _CONTROL.search(text)):
            raise _Invalid("bad interface name")
        return text
    return _scalar("an interface name of 1 to 15 bytes without '/', ':', spaces or control characters", convert)


# C0 and C1 control characters and DEL: they garble the log lines and tables a value ends in.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _absolute_path(max_bytes: int | None = None, nullable: bool = False) -> _Field:
    def convert(value: Any) -> str | None:
        if value is None and nullable:
            return None
        text = _text(value)
        if not text.startswith("/") or "\0" in text:
            raise _Invalid("not an absolute path")
        if _CONTROL.search(text):
            raise _Invalid("control character in path")
        if max_bytes is not None and len(text.encode()) > max_bytes:
            raise _Invalid("path too long")
        return text
    limit = f" of at most {max_bytes} bytes" if max_bytes else ""
    return _scalar(f"an absolute path{limit}{', or null' if nullable else ''}", convert)


def _raw(expected: str) -> _Field:
    """A key whose value the caller checks itself, because it depends on other keys."""
    return _Field(lambda value, path, report: value, expected)


# --- mappings and sections -------------------------------------------------------------

def _default(cls: type, name: str, field: _Field | None = None) -> Any:
    if field is not None and field.default is not _NOTHING:
        return field.default
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _check_mapping(raw: Any, path: str, report: _Report, cls: type,
                   spec: dict[str, _Field]) -> tuple[dict[str, Any], bool]:
    """Checks the keys of `raw` against `spec`. Returns the valid values, with defaults
    from `cls` for absent keys (a key that was present but wrong is left out), and
    whether everything was valid."""
    allowed = ", ".join(spec)
    if not isinstance(raw, dict):
        report.error(path, "not a mapping", f"a mapping with keys {allowed}", raw)
        return {}, False
    ok = True
    for key in raw:
        if not (isinstance(key, str) and key in spec):
            report.error(_join(path, key), "unknown key", f"one of {allowed}", key)
            ok = False
    values = {}
    for name, field in spec.items():
        if name in raw:
            value = field.check(raw[name], _join(path, name), report)
            if value is _INVALID:
                ok = False
            else:
                values[name] = value
        elif field.required:
            report.error(_join(path, name), "missing", field.expected)
            ok = False
        elif (default := _default(cls, name, field)) is not dataclasses.MISSING:
            values[name] = default
    return values, ok


def _section(cls: type, spec: dict[str, _Field],
             relations: Callable[[dict[str, Any], str, _Report], bool] = lambda values, path, report: True
             ) -> _Field:
    """A nested mapping that becomes `cls`. null or absent means all defaults (a section
    whose every line is commented out). `relations` checks keys against each other; it
    sees only the valid values."""
    def check(value: Any, path: str, report: _Report) -> Any:
        values, ok = _check_mapping({} if value is None else value, path, report, cls, spec)
        ok = relations(values, path, report) and ok
        return cls(**values) if ok else _INVALID
    return _Field(check, "a mapping with keys " + ", ".join(spec))


def _probe_bytes() -> _Field:
    """Bytes for a UDP probe, written as a string whose characters are the bytes ("\\x00" to
    "\\xff" escapes in a double-quoted YAML string)."""
    def convert(value: Any) -> str | None:
        if value is None:
            return None
        text = _text(value)
        if not text:
            raise _Invalid("empty")
        if max(map(ord, text)) > 0xFF:
            raise _Invalid("a character beyond \\xff")
        if len(text) > MAX_PROBE_BYTES:
            raise _Invalid("too long")
        return text
    return _scalar(f"a string of 1 to {MAX_PROBE_BYTES} characters from \\x00 to \\xff (one byte each), or null",
                   convert)


def _dns_name() -> _Field:
    def convert(value: Any) -> str:
        text = _text(value)
        labels = text.rstrip(".").split(".") if text != "." else []
        if (not text or len(text.rstrip(".")) > 253
                or not all(re.fullmatch(r"[A-Za-z0-9_-]{1,63}", label) for label in labels)):
            raise _Invalid("not a DNS name")
        return text
    return _scalar("a DNS name such as example.com or '.' (labels of letters, digits, '-' and '_')", convert)


def _optional(field: _Field) -> _Field:
    """`field`, or null."""
    def check(value: Any, path: str, report: _Report) -> Any:
        return None if value is None else field.check(value, path, report)
    return _Field(check, f"{field.expected}, or null")


def _list_of(item: _Field, *, most: int, nullable: bool = False) -> _Field:
    """A non-empty list of `item`s, as a tuple."""
    expected = f"a list of 1 to {most} of: {item.expected}" + (", or null" if nullable else "")

    def check(value: Any, path: str, report: _Report) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, list) or not value or len(value) > most:
            problem = "not a list" if not isinstance(value, list) else "empty" if not value else "too long"
            report.error(path, problem, expected, value)
            return _INVALID
        items = [item.check(v, f"{path}[{i}]", report) for i, v in enumerate(value)]
        return _INVALID if _INVALID in items else tuple(items)
    return _Field(check, expected)


def _pattern(expected: str, regex: str, problem: str, max_chars: int) -> _Field:
    def convert(value: Any) -> str:
        text = _text(value)
        if len(text) > max_chars or not re.fullmatch(regex, text):
            raise _Invalid(problem)
        return text
    return _scalar(expected, convert)


def _argv() -> _Field:
    argument = _pattern("a string without NUL", r"[^\0]*", "NUL in argument", 4096)
    argv = _list_of(argument, most=MAX_ARGV)

    def check(value: Any, path: str, report: _Report) -> Any:
        args = argv.check(value, path, report)
        if args is not _INVALID and not args[0].startswith("/"):
            report.error(f"{path}[0]", "not an absolute path", "the program as an absolute path (no shell, "
                         "no PATH search)", args[0])
            return _INVALID
        return args
    return _Field(check, f"a list of 1 to {MAX_ARGV} strings, the first an absolute path")


_PROBE = {
    "type": _optional(_choice(model.PROBE_TYPES)),
    "timeout": _optional(_duration()),
    "method": _pattern("an HTTP method such as GET or HEAD", r"[A-Z]{1,20}", "not an HTTP method", 20),
    "path": _pattern("a path from / of printable ASCII without spaces, at most 1024 characters",
                     r"/[!-~]*", "not an HTTP path", 1024),
    "expect_status": _list_of(_integer(100, 599), most=500, nullable=True),
    "host": _optional(_pattern("a host name or address, with :PORT or not", r"[A-Za-z0-9_.:\[\]-]{1,255}",
                               "not a host", 255)),
    "server_name": _optional(_pattern("a DNS name or IP address", r"[A-Za-z0-9_.:-]{1,253}",
                                      "not a name", 253)),
    "verify": _boolean(),
    "ca_file": _optional(_absolute_path()),
    "query_name": _dns_name(),
    "query_type": _choice(tuple(model.DNS_TYPES)),
    "transport": _choice(("udp", "tcp")),
    "expect_rcodes": _list_of(_choice(tuple(model.DNS_RCODES)), most=len(model.DNS_RCODES)),
    "command": _argv(),
}
# The keys each probe type reads besides `type` and `timeout`; any other is refused.
_PROBE_KEYS = {
    None: (), "tcp": (), "udp": (),
    "http": ("method", "path", "expect_status", "host"),
    "https": ("method", "path", "expect_status", "host", "server_name", "verify", "ca_file"),
    "tls": ("server_name", "verify", "ca_file"),
    "dns": ("query_name", "query_type", "transport", "expect_rcodes"),
    "exec": ("command",),
}


def _probe() -> _Field:
    section = _section(model.ProbeSettings, _PROBE)

    def check(value: Any, path: str, report: _Report) -> Any:
        probe = section.check(value, path, report)
        if probe is _INVALID or not isinstance(value, dict):
            return probe
        ok = True
        allowed = _PROBE_KEYS[probe.type]
        for key in value:
            if key in _PROBE and key not in ("type", "timeout") and key not in allowed:
                report.error(_join(path, key), f"not a key of probe type {probe.type or 'tcp/udp'}",
                             "only " + ", ".join(("type", "timeout") + allowed), value[key])
                ok = False
        if probe.type == "exec" and "command" not in value:
            report.error(_join(path, "command"), "missing", _PROBE["command"].expected)
            ok = False
        return probe if ok else _INVALID
    return _Field(check, section.expected)


def _probe_fits_protocol(service: dict[str, Any], path: str, report: _Report) -> bool:
    """A connect, HTTP or TLS probe needs a TCP service, the UDP request a UDP one."""
    health, protocol = service.get("health"), service.get("protocol")
    kind = health.probe.type if health is not None else None
    if protocol is None or kind is None or kind in ("dns", "exec") or (kind == "udp") == (protocol == "udp"):
        return True
    fits = "dns, exec, udp" if protocol == "udp" else "dns, exec, tcp, http, https, tls"
    report.error(_join(_join(_join(path, "health"), "probe"), "type"), f"not a probe of a {protocol} service",
                 f"one of {fits}", kind)
    return False


def _backoff_in_order(health: dict[str, Any], path: str, report: _Report) -> bool:
    initial, maximum = health.get("probe_backoff_initial"), health.get("probe_backoff_max")
    if initial is None or maximum is None or maximum >= initial:
        return True
    report.error(_join(path, "probe_backoff_max"), "below probe_backoff_initial",
                 f"a number >= probe_backoff_initial ({initial:g})", maximum)
    return False


_HEALTH = {
    "enabled": _boolean(),
    "connect_deadline_floor": _duration(),
    # Below 1 the deadline would fall under the backend's own p99: healthy connects failing.
    "connect_deadline_multiple": _number(at_least=1),
    "connect_history_min": _integer(1),
    "failure_threshold": _integer(1),
    "max_quarantined": _integer(0, nullable=True),
    "correlated_fraction": _removed(_CORRELATED_REMOVED),
    "correlated_window": _removed(_CORRELATED_REMOVED),
    "quarantine_weight": _integer(0, 65535),
    "probe_backoff_initial": _duration(),
    "probe_backoff_factor": _number(at_least=1),
    "probe_backoff_max": _duration(),
    "probe_jitter": _number(at_least=0, below=1),
    "rise": _integer(1),
    "slow_start": _duration(),
    "slow_start_initial_fraction": _fraction(),
    "probation": _duration(),
    "udp_reply_window": _duration(),
    "udp_probe_payload": _probe_bytes(),
    "udp_probe_expect": _probe_bytes(),
    "dns_probe_name": _dns_name(),
    "probe": _probe(),
    "active_interval": _optional(_duration()),
}

_SYSCTLS = {
    "conntrack": _boolean(),
    "expire_nodest_conn": _boolean(),
    "expire_quiescent_template": _boolean(),
    "conn_reuse_mode": _choice(("auto", 0, 1, 2)),
}

_TRACER = {
    # BPF map sizes are u32; the ring buffer is rounded up to a power of two pages.
    "connection_capacity": _integer(1, 2**32 - 1),
    "ring_buffer_pages": _integer(1, 2**20),
    "report_closed": _boolean(),
    # Kept in the BPF options as whole microseconds (u32); more than a second would only
    # delay the daemon's view of successes.
    "wakeup_interval": _seconds(at_least=0, at_most=1),
    # Microseconds in the kernel too; a longer interval would starve the connect history.
    "sample_interval": _seconds(at_least=0, at_most=1),
}

_SETTINGS = {
    "vip_interface": _interface_name(),
    "manage_vips": _boolean(),
    "state_dir": _absolute_path(),
    # sun_path holds 108 bytes including the terminating NUL.
    "status_socket": _absolute_path(max_bytes=107),
    "control_socket": _absolute_path(max_bytes=107, nullable=True),
    "metrics_address": _metrics_address(),
    "log_level": _choice(LOG_LEVELS),
    "nice": _integer(-20, 19, nullable=True),
    # At least a second: the daemon reads all of IPVS back this often, which takes
    # about as long as `ipvsadm -Sn` listing the same table.
    "ipvs_verify_interval": _verify_interval(),
    "notify_command": _optional(_argv()),
    "notify_timeout": _duration(),
    # Each hook is a process (and a thread of asyncio's that waits for it): the packaged
    # unit's TasksMax=64 leaves room for this many.
    "notify_concurrency": _integer(1, 16),
    "sysctls": _section(model.Sysctls, _SYSCTLS),
    "tracer": _section(model.TracerSettings, _TRACER),
}


# --- services and backends -------------------------------------------------------------

def _scheduler_flags() -> _Field:
    def check(value: Any, path: str, report: _Report) -> Any:
        if value is None:
            return ()
        if not isinstance(value, list):
            report.error(path, "not a list", "a list of " + flag.expected, value)
            return _INVALID
        flags = [flag.check(item, f"{path}[{i}]", report) for i, item in enumerate(value)]
        ok = _INVALID not in flags
        for i, name in enumerate(flags):
            if name is not _INVALID and flags.index(name) < i:
                report.error(f"{path}[{i}]", "duplicate flag", "each flag once", name)
                ok = False
        return tuple(flags) if ok else _INVALID
    flag = _choice(model.SCHEDULER_FLAGS)
    return _Field(check, "a list of " + flag.expected)


_SERVICE = {
    "name": _name().needed(),
    "protocol": _choice(tuple(model.PROTOCOLS)).defaulting("tcp"),
    "vip": _vip().needed(),
    "port": _port().needed(),
    "scheduler": _choice(model.SCHEDULERS),
    "persistence_timeout": _integer(0, 2**32 - 1),
    "forwarding": _choice(FORWARDING),
    "scheduler_flags": _scheduler_flags(),
    "backends": _raw("a non-empty list of backends").needed(),
    "health": _section(model.HealthSettings, _HEALTH, _backoff_in_order),
}

_BACKEND = {
    "address": _address().needed(),
    # Absent: the service's port.
    "port": _port(),
    "weight": _integer(0, 65535),
}
_BACKEND_FORMS = "a mapping with keys address, port, weight, or 'ADDRESS', 'ADDRESS:PORT', '[IPV6]:PORT'"


def _services() -> _Field:
    def check(value: Any, path: str, report: _Report) -> Any:
        if value is None:  # `services:` with every entry commented out
            return ()
        if not isinstance(value, list):
            report.error(path, "not a list", "a list of services", value)
            return _INVALID
        texts = report.service_texts if report.service_texts and len(report.service_texts) == len(value) else None
        checked: list[tuple[dict[str, Any], model.Service | None]] = []
        for i, item in enumerate(value):
            text = texts[i] if texts is not None else None
            if isinstance(item, _Reused):
                checked.append((item.values, item.service))
            else:
                before = len(report.messages)
                values, service = _service(item, f"{path}[{i}]", report)
                checked.append((values, service))
                if text is None or service is None or len(report.messages) > before:
                    continue
                item = _Reused(values, service)
            if text is not None:
                report.checked_services[text] = item
        unique = _unique_services([values for values, _ in checked], path, report)
        services = tuple(service for _, service in checked)
        return services if unique and all(s is not None for s in services) else _INVALID
    return _Field(check, "a list of services")


def _service(raw: Any, path: str, report: _Report) -> tuple[dict[str, Any], model.Service | None]:
    """Returns the valid values (for the uniqueness checks across services) and the
    service, or None if anything is wrong with it."""
    values, ok = _check_mapping(raw, path, report, model.Service, _SERVICE)
    if "backends" in values:
        backends = _backends(values["backends"], _join(path, "backends"), report, values)
        ok = ok and backends is not None
        values["backends"] = backends
    ok = _flags_fit_scheduler(values, path, report) and ok
    ok = _probe_fits_protocol(values, path, report) and ok
    return values, model.Service(**values) if ok else None


def _flags_fit_scheduler(service: dict[str, Any], path: str, report: _Report) -> bool:
    scheduler = service.get("scheduler")
    ok = True
    for i, flag in enumerate(service.get("scheduler_flags", ())):
        owner = flag.split("-")[0]
        if owner in ("sh", "mh") and scheduler is not None and owner != scheduler:
            report.error(f"{_join(path, 'scheduler_flags')}[{i}]", f"flag of the {owner} scheduler",
                         f"flag-1, flag-2 or flag-3 with scheduler {scheduler}", flag)
            ok = False
    return ok


def _backends(raw: Any, path: str, report: _Report,
              service: dict[str, Any]) -> tuple[model.Backend, ...] | None:
    if not isinstance(raw, list) or not raw:
        problem = "empty" if raw == [] else "not a list"
        report.error(path, problem, "a non-empty list of backends", raw)
        return None
    backends = []
    first: dict[tuple[model.IPAddress, int], int] = {}
    for i, item in enumerate(raw):
        item_path = f"{path}[{i}]"
        values, ok = _backend(item, item_path, report, service.get("port"))
        ok = _backend_fits(values, item, item_path, report, service) and ok
        address, port = values.get("address"), values.get("port")
        if address is not None and port is not None and first.setdefault((address, port), i) != i:
            report.error(item_path, "duplicate backend",
                         f"each address and port once (backends[{first[(address, port)]}] has it)",
                         model.format_endpoint((address, port)))
            ok = False
        backends.append(model.Backend(**values) if ok else None)
    complete = [b for b in backends if b is not None]
    return tuple(complete) if len(complete) == len(backends) else None


def _backend(raw: Any, path: str, report: _Report, service_port: int | None) -> tuple[dict[str, Any], bool]:
    """The backend's valid values, its port defaulted to the service's, and whether it is
    all valid."""
    if isinstance(raw, str):
        try:
            address, port = _endpoint(raw)
        except _Invalid as bad:
            report.error(path, str(bad), _BACKEND_FORMS, raw)
            return {}, False
        values = {"address": address, "port": service_port if port is None else port,
                  "weight": _default(model.Backend, "weight")}
        ok = True
    elif isinstance(raw, dict):
        values, ok = _check_mapping(raw, path, report, model.Backend, _BACKEND)
        if "port" not in raw:
            values["port"] = service_port
    else:
        report.error(path, "not a mapping or string", _BACKEND_FORMS, raw)
        return {}, False
    # No port of its own and no valid service port: that error has been reported already.
    if values.get("port") is None:
        values.pop("port", None)
        ok = False
    return values, ok


def _backend_fits(backend: dict[str, Any], raw: Any, path: str, report: _Report,
                  service: dict[str, Any]) -> bool:
    """What IPVS needs of a backend given the service's VIP, port and forwarding method."""
    def where(key: str) -> str:
        return path if isinstance(raw, str) else _join(path, key)

    vip, port, forwarding = service.get("vip"), service.get("port"), service.get("forwarding")
    address, backend_port = backend.get("address"), backend.get("port")
    ok = True
    # IPVS forwards to the other address family only by encapsulating (tunnel).
    if (vip is not None and address is not None and forwarding in ("masq", "route")
            and address.version != vip.version):
        report.error(where("address"), f"IPv{address.version} backend for an IPv{vip.version} VIP",
                     f"an IPv{vip.version} address (only forwarding: tunnel mixes families)", str(address))
        ok = False
    # IPVS would hand the VIP's connections to the VIP itself: a loop, not a backend.
    if vip is not None and address is not None and address == vip:
        report.error(where("address"), "backend is the service's VIP",
                     "an address other than the VIP", str(address))
        ok = False
    # Route and tunnel forward the packet unchanged: the backend sees the VIP's port.
    if (port is not None and backend_port is not None and forwarding in ("route", "tunnel")
            and backend_port != port):
        report.error(where("port"), f"port differs from the service port under {forwarding} forwarding",
                     f"{port} (only masq can change the port)", backend_port)
        ok = False
    return ok


def _unique_services(services: list[dict[str, Any]], path: str, report: _Report) -> bool:
    names: dict[str, int] = {}
    keys: dict[tuple[str, model.IPAddress, int], int] = {}
    ok = True
    for i, service in enumerate(services):
        name = service.get("name")
        if name is not None and names.setdefault(name, i) != i:
            report.error(f"{path}[{i}].name", "duplicate name",
                         f"a name no other service has ({path}[{names[name]}] has it)", name)
            ok = False
        protocol, vip, port = service.get("protocol"), service.get("vip"), service.get("port")
        if protocol is not None and vip is not None and port is not None \
                and (first := keys.setdefault((protocol, vip, port), i)) != i:
            report.error(f"{path}[{i}]", "duplicate protocol, vip and port",
                         f"each once across services ({path}[{first}] has it)",
                         f"{protocol} {model.format_endpoint((vip, port))}")
            ok = False
    return ok



_CONFIG = {
    "settings": _section(model.Settings, _SETTINGS),
    "services": _services().needed(),
}


def _config(doc: Any, report: _Report) -> model.Config | None:
    if doc is None:
        report.note("file is empty, expected a mapping with 'services'")
        return None
    if not isinstance(doc, dict):
        report.error("top level", "not a mapping", "a mapping with keys settings, services", doc)
        return None
    values, ok = _check_mapping(doc, "", report, model.Config, _CONFIG)
    return model.Config(**values) if ok else None
