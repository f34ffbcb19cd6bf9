"""A reload parses the whole file again; entries of `services` unchanged since the last good
parse are reused, not composed and checked again. The result must be what a parse from
nothing gives, whatever changed."""
from __future__ import annotations

import random

import pytest

from ipvslb import config

HEAD = "settings:\n  state_dir: /var/lib/ipvslb\nservices:\n"


def service(i: int, backends: int = 3) -> str:
    return (f"  - name: svc{i}\n    vip: 10.93.{i // 250}.{i % 250 + 1}\n    port: 80\n    scheduler: rr\n"
            "    backends:\n"
            + "".join(f"      - {{address: 10.77.{j}.2, port: 8080, weight: 10}}\n" for j in range(1, backends + 1)))


def forget() -> None:
    config._reusable, config._reusable_by_first_line = {}, {}
    config._last_text, config._last_entries = "", []


def from_nothing(text: str):
    forget()
    return outcome(text)


def outcome(text: str):
    try:
        return config.parse(text)
    except config.ConfigError as err:
        return err.messages


@pytest.fixture(autouse=True)
def no_reuse_between_tests():
    forget()
    yield
    forget()


def test_unchanged_entries_are_the_same_objects_and_a_changed_one_is_new():
    first = config.parse(HEAD + "".join(service(i) for i in range(20)))
    second = config.parse(HEAD + "".join(service(i, 2 if i == 7 else 3) for i in range(20)))
    assert [a is b for a, b in zip(first.services, second.services, strict=True)] == [i != 7 for i in range(20)]
    assert len(second.services[7].backends) == 2


def test_any_sequence_of_edits_parses_as_from_nothing():
    rng = random.Random(7)
    entries = [service(i) for i in range(30)]
    before: tuple = ()
    shared = possible = 0
    for step in range(80):
        i = rng.randrange(len(entries))
        match rng.randrange(8):
            case 0:
                entries.pop(i)
            case 1:
                entries.insert(i, service(1000 + step))
            case 2:  # an entry that goes on past the text it had
                entries[i] += "      - {address: 10.77.9.2, port: 8080, weight: 10}\n"
            case 3:
                entries[i] = entries[i].replace("weight: 10", "weight: 7", 1)
            case 4:  # a comment at the left margin inside an entry, then more of it
                entries[i] += "# note\n    forwarding: masq\n"
            case 5:  # an error: refused, and the next parse still right
                entries[i] = entries[i].replace("port: 80", "port: 0", 1)
            case 6:
                entries[i] = service(i)
            case 7:  # blank and comment lines between entries
                entries[i] = "\n# between\n  # indented\n" + entries[i]
        text = HEAD + "".join(entries) + ("extra: 1\n" if step % 9 == 0 else "")
        reused = outcome(text)
        assert reused == from_nothing(text), f"step {step}"
        if isinstance(reused, config.model.Config):
            shared += len({id(s) for s in reused.services} & {id(s) for s in before})
            possible += len(before)
        last = outcome(text)  # leave the reuse state of this text for the next step
        before = last.services if isinstance(last, config.model.Config) else ()
    # The reuse was taken (unchanged entries are the same objects), not the full parse.
    assert possible > 100 and shared > possible // 2


def test_an_anchor_anywhere_turns_reuse_off():
    text = HEAD + "".join(service(i) for i in range(3))
    first = config.parse(text)
    second = config.parse(text + "# &anchor\n")
    assert second == first and not any(a is b for a, b in zip(first.services, second.services, strict=True))


def test_a_reload_parses_only_the_changed_entry_and_keeps_lines():
    config.parse(HEAD + "".join(service(i) for i in range(20)))
    text = HEAD + "".join(service(i, 2 if i == 7 else 3) for i in range(20))
    short, found = config._shortened(text)
    assert [len(run) for run in found] == [7, 12] and service(7, 2).rstrip() in short
    assert short.count("\n") == text.count("\n")   # errors elsewhere keep their line numbers
    assert "svc3" not in short


WRAPPED = {
    # The same text, but not an entry of `services`: placeholders there must not be taken.
    "quoted": lambda e: f'settings:\n  state_dir: "/var/lib/ipvslb\n{e}"\nservices:\n' + service(50),
    "other key": lambda e: f"{HEAD}{service(50)}extra:\n{e}",
    "flow": lambda e: f"{HEAD[:-1]} [\n{e}]\n",
    "nested": lambda e: f"{HEAD}  - name: outer\n    backends:\n{e}",
    "comment then more": lambda e: f"{HEAD}{e}# a comment at the margin\n      scheduler: wrr\n",
    "trailing comment": lambda e: f"{HEAD}{e.rstrip()}  # a comment\n",
    "more of it": lambda e: f"{HEAD}{e}    forwarding: route\n",
    "deeper next": lambda e: f"{HEAD}{e}      - 10.77.9.9\n",
    "plain continuation": lambda e: f"{HEAD}{e.replace('weight: 10}}', 'weight: 10}}, 10.77.9.9', 1)}"
                                    f"  - name: x\n    scheduler: rr\n      wrr\n",
    "root sequence": lambda e: e,
    "twice": lambda e: f"{HEAD}{e}{e}",
    "services twice": lambda e: f"{HEAD}{e}services:\n{e}",
    "document end": lambda e: f"{HEAD}{e}...\n",
    "tab after": lambda e: f"{HEAD}{e}\t\n",
}


# One entry of the last parse, found by its first line; all of them, which the new text
# begins or ends with, found as a run.
ENTRIES = {"one": service(3), "all": "".join(service(i) for i in range(6))}


@pytest.mark.parametrize("entries", ENTRIES)
@pytest.mark.parametrize("wrap", WRAPPED)
def test_entry_texts_in_another_context_parse_as_from_nothing(wrap, entries):
    config.parse(HEAD + "".join(service(i) for i in range(6)))
    text = WRAPPED[wrap](ENTRIES[entries])
    assert outcome(text) == from_nothing(text)


def test_runs_at_the_start_and_end_are_found_without_the_line_scan():
    config.parse(HEAD + "".join(service(i) for i in range(20)))
    config._reusable_by_first_line = {}  # what the line scan would use
    text = HEAD + "".join(service(i) for i in range(20) if i != 7)
    short, found = config._shortened(text)
    assert [len(run) for run in found] == [7, 12] and "svc8" not in short
    assert outcome(text) == from_nothing(text)


def test_any_small_edit_of_characters_parses_as_from_nothing():
    """Edits anywhere, mid-line too, so that the parts the old and new text start and end
    with stop inside entries, keys and quotes."""
    pieces = [" ", "\n", "-", "#", "'", '"', "[", "]", "{", "}", ":", ",", "a", "1", "\t", "\r", "  - ",
              "\n  - name: k\n"]
    for seed in range(12):
        rng = random.Random(seed)
        forget()
        text = HEAD + "".join(service(i) for i in range(rng.randint(1, 8)))
        outcome(text)
        for step in range(25):
            if rng.random() < 0.5:
                text = HEAD + "".join(service(i) for i in range(rng.randint(1, 8)))
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(text) + 1)
                if rng.random() < 0.5:
                    text = text[:at] + rng.choice(pieces) + text[at:]
                else:
                    text = text[:at] + text[at + rng.randint(1, 5):]
            reused = outcome(text)
            assert reused == from_nothing(text), f"seed {seed}, step {step}: {text!r}"
            outcome(text)
