from pathlib import Path

from ipvslb.tracer import loader


def test_a_source_checkout_finds_its_own_bpf_program(monkeypatch):
    monkeypatch.delenv("IPVSLB_BPF_DIR", raising=False)
    assert loader.source_path() == Path(__file__).resolve().parents[2] / "bpf" / "ipvslb.bpf.c"
