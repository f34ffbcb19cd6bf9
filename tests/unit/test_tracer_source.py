from pathlib import Path

from ipvslb.tracer import loader


def test_a_source_checkout_finds_its_own_bpf_program(monkeypatch):
    monkeypatch.delenv("IPVSLB_BPF_DIR", raising=False)
    assert loader.source_path() == Path(__file__).resolve().parents[2] / "bpf" / "ipvslb.bpf.c"


def test_the_package_offers_the_settings_its_tracer_takes():
    import ipvslb.tracer
    from ipvslb import model

    assert ipvslb.tracer.TracerSettings is model.TracerSettings  # `ipvslb events` without a config
