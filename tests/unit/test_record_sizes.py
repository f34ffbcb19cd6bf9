"""The structs the BPF program shares with records.py: their sizes reach the compile, where
the program checks its own structs against them (the kernel tests compile it)."""
import re
import sys
from types import SimpleNamespace

import pytest

from ipvslb.tracer import loader, records


def test_the_sizes_are_those_records_py_packs_with():
    assert loader.size_flags() == [f"-D{macro}={layout.size}" for macro, layout in loader.SHARED_STRUCTS.items()]
    assert {macro: layout.size for macro, layout in loader.SHARED_STRUCTS.items()
            if macro in ("RECORD_SIZE", "PAIR_SIZE", "PAIR_STATS_SIZE", "VIP_KEY_SIZE")} == {
        "RECORD_SIZE": 88, "PAIR_SIZE": 40, "PAIR_STATS_SIZE": 24, "VIP_KEY_SIZE": 20}


def test_the_tracer_compiles_with_the_sizes(monkeypatch):
    compiled = []

    def bpf(src_file, cflags):
        compiled.append(cflags)
        raise Exception("stop after the compiler's arguments")  # as bcc fails a compile

    monkeypatch.setitem(sys.modules, "bcc", SimpleNamespace(BPF=bpf))
    monkeypatch.setattr("ipvslb.preflight.headers", lambda release: None)
    monkeypatch.setattr(loader, "sock_layout", lambda: ["-DSK_PROTOCOL=532"])
    with pytest.raises(loader.TracerUnavailable, match="stop after the compiler's arguments"):
        loader.Tracer()
    [cflags] = compiled
    assert set(loader.size_flags()) <= set(cflags) and "-DSK_PROTOCOL=532" in cflags


def test_the_program_asserts_each_size_against_its_struct():
    """Every shared struct is asserted, against the Struct of its name in records.py."""
    source = loader.source_path().read_text()
    asserted = dict(re.findall(r"_Static_assert\(sizeof\(struct (\w+)\) == (\w+)_SIZE,", source))
    assert {"record", "pair", "pair_stats", "vip_key"} <= set(asserted)
    assert {f"{name}_SIZE" for name in asserted.values()} == set(loader.SHARED_STRUCTS)
    for struct, name in asserted.items():
        assert name == struct.upper() and loader.SHARED_STRUCTS[f"{name}_SIZE"] is getattr(records, name)
