"""Where the tracer reads struct sock: offsets from BTF, checked before any BPF is compiled."""
from pathlib import Path

import pytest

from ipvslb.tracer import btf
from ipvslb.tracer.btf import Field
from ipvslb.tracer.loader import SOCK_FIELDS, TracerUnavailable, layout_flags

# struct sock_common and struct sock of Debian's 6.12 kernel (the fields the tracer reads).
COMMON = {"skc_daddr": Field(0, 4, False), "skc_rcv_saddr": Field(4, 4, False), "skc_dport": Field(12, 2, False),
          "skc_num": Field(14, 2, False), "skc_family": Field(16, 2, False), "skc_state": Field(18, 1, False),
          "skc_v6_daddr": Field(56, 16, False), "skc_v6_rcv_saddr": Field(72, 16, False)}
SOCK = {"__sk_common": Field(0, 136, False), "sk_protocol": Field(532, 2, False)}
INET = {"sk": Field(0, 760, False), "inet_sport": Field(782, 2, False)}


def machine_types() -> btf.KernelTypes:
    """This machine's kernel types, or the test skipped where it has no BTF."""
    if not Path("/sys/kernel/btf/vmlinux").exists():
        pytest.skip("this kernel has no BTF")
    try:
        return btf.KernelTypes()
    except btf.BtfUnavailable as err:
        pytest.skip(str(err))


def structs(**changed):
    return {"sock": SOCK, "sock_common": COMMON, "inet_sock": INET, **changed}


def test_every_field_the_program_reads_gets_its_offset():
    flags = layout_flags(structs())
    assert flags == ["-DSKC_DADDR=0", "-DSKC_RCV_SADDR=4", "-DSKC_DPORT=12", "-DSKC_FAMILY=16", "-DSKC_STATE=18",
                     "-DSKC_V6_DADDR=56", "-DSKC_V6_RCV_SADDR=72", "-DSK_PROTOCOL=532", "-DINET_SPORT=782",
                     "-DSK_HEAD_LEN=24"]


def test_sock_common_fields_are_placed_where_sock_holds_its_common_part():
    moved = dict(SOCK, __sk_common=Field(8, 136, False))
    flags = layout_flags(structs(sock=moved))
    assert "-DSKC_DPORT=20" in flags and "-DSK_PROTOCOL=532" in flags


def test_an_inet_sock_that_does_not_begin_with_its_sock_is_refused():
    with pytest.raises(TracerUnavailable, match="struct inet_sock does not begin with its struct sock"):
        layout_flags(structs(inet_sock=dict(INET, sk=Field(8, 760, False))))


def test_a_head_beyond_what_is_read_at_once_is_refused():
    far = dict(COMMON, skc_state=Field(90, 1, False))
    with pytest.raises(TracerUnavailable, match="end at byte 91 in this kernel; the tracer reads at most 64"):
        layout_flags(structs(sock_common=far))


def test_a_missing_field_is_named():
    no_v6 = {k: v for k, v in COMMON.items() if k != "skc_v6_daddr"}
    with pytest.raises(TracerUnavailable, match="struct sock_common has no field skc_v6_daddr"):
        layout_flags(structs(sock_common=no_v6))


def test_a_bitfield_protocol_of_old_kernels_is_refused_by_name():
    old = dict(SOCK, sk_protocol=Field(528, 1, True))
    with pytest.raises(TracerUnavailable, match=r"struct sock\.sk_protocol is a bitfield .* before Linux 5\.6"):
        layout_flags(structs(sock=old))


def test_a_field_of_another_size_is_refused_with_both_sizes():
    wide = dict(COMMON, skc_family=Field(16, 4, False))
    with pytest.raises(TracerUnavailable, match=r"struct sock_common\.skc_family is 4 bytes .* reads 2 bytes"):
        layout_flags(structs(sock_common=wide))


def test_this_machines_kernel_describes_every_field_through_libbpf():
    with machine_types() as types:
        common, sock, inet = types.fields("sock_common"), types.fields("sock"), types.fields("inet_sock")
    # Fields inside sock_common's anonymous unions and structs are found at their real place.
    assert common["skc_dport"] == Field(12, 2, False) and common["skc_num"] == Field(14, 2, False)
    assert common["skc_daddr"] == Field(0, 4, False) and common["skc_family"] == Field(16, 2, False)
    assert sock["__sk_common"].offset == 0 and inet["sk"].offset == 0
    flags = layout_flags({"sock": sock, "sock_common": common, "inet_sock": inet})
    assert len(flags) == len(SOCK_FIELDS) + 1 and flags[-1] == "-DSK_HEAD_LEN=24"


def test_a_struct_the_kernel_lacks_is_named():
    with machine_types() as types, pytest.raises(btf.BtfUnavailable, match="no struct ipvslb_no_such_struct"):
        types.fields("ipvslb_no_such_struct")
