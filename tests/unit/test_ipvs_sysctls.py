from __future__ import annotations

import pytest

from ipvslb.ipvs import sysctls
from ipvslb.model import Sysctls


@pytest.mark.parametrize("release, mode", [("4.19.0-27-amd64", 0), ("5.8.18", 0), ("5.9.0", 1),
                                           ("6.12.117+deb13-amd64", 1), ("7.2.13-amd64", 1)])
def test_conn_reuse_mode_auto_follows_the_5_9_fix(release, mode):
    assert sysctls.desired(Sysctls(), release)["conn_reuse_mode"] == mode


def test_only_differing_values_are_written(tmp_path):
    for name, value in (("conntrack", 1), ("expire_nodest_conn", 0), ("expire_quiescent_template", 1),
                        ("conn_reuse_mode", 1)):
        (tmp_path / name).write_text(f"{value}\n")
    changed = sysctls.apply(Sysctls(expire_quiescent_template=False, conn_reuse_mode=2), tmp_path, "6.1.0")
    assert changed == {"expire_nodest_conn": 1, "expire_quiescent_template": 0, "conn_reuse_mode": 2}
    assert (tmp_path / "conn_reuse_mode").read_text() == "2\n"
    assert sysctls.apply(Sysctls(expire_quiescent_template=False, conn_reuse_mode=2), tmp_path, "6.1.0") == {}
