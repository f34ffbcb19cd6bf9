"""Where the ICMP kprobes read struct sk_buff: offsets from BTF, checked before compiling."""
import pytest

from ipvslb.tracer.btf import Field
from ipvslb.tracer.loader import TracerUnavailable, skb_flags
from tests.unit.test_sock_layout import machine_types

# struct sk_buff of Debian's 6.12 kernel (the fields the ICMP kprobes read).
SKB = {"head": Field(200, 8, False), "network_header": Field(186, 2, False)}


def test_head_and_network_header_get_their_offsets():
    assert skb_flags(SKB) == ["-DSKB_HEAD=200", "-DSKB_NETWORK_HEADER=186"]


def test_a_missing_or_reshaped_field_is_named():
    with pytest.raises(TracerUnavailable, match="struct sk_buff.network_header is not a field of 2 bytes"):
        skb_flags({"head": SKB["head"]})
    with pytest.raises(TracerUnavailable, match="struct sk_buff.head is not a field of 8 bytes"):
        skb_flags(dict(SKB, head=Field(200, 4, False)))


def test_this_machines_kernel_describes_both_fields():
    with machine_types() as types:
        fields = types.fields("sk_buff")
    # network_header sits in an anonymous struct of a struct_group: lifted to sk_buff's level.
    assert fields["network_header"].size == 2 and fields["head"].size == 8
    assert len(skb_flags(fields)) == 2
