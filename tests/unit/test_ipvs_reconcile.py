"""The pure plan: desired vs kernel -> writes."""
from __future__ import annotations

import ipaddress

from ipvslb.ipvs.reconcile import plan
from ipvslb.ipvs.specs import DestSpec, ServiceSpec

ip = ipaddress.ip_address


def svc(vip: str, scheduler: str = "wlc", port: int = 80, protocol: str = "tcp") -> ServiceSpec:
    return ServiceSpec(protocol, ip(vip).packed, port, scheduler, 0, 0, 0xFFFFFFFF)


def dest(n: int, weight: int = 1, forwarding: int = 0) -> DestSpec:
    return DestSpec(ip(f"10.77.{n}.2").packed, 8080, forwarding, weight)


WEB = svc("10.90.0.1")
DNS = svc("10.90.0.2", "rr", 53, "udp")
FOREIGN = svc("10.99.0.1", "lc")


def by_key(*dests: DestSpec) -> dict:
    return {d.key: d for d in dests}


def kinds(ops):
    return [(op.kind.value, op.service.key[1][-1], op.dest.address[-2] if op.dest else None) for op in ops]


def test_empty_kernel_gets_services_then_their_destinations():
    ops = plan([(WEB, [dest(1), dest(2)])], {}, {}, set())
    assert kinds(ops) == [("add-service", 1, None), ("add-dest", 1, 1), ("add-dest", 1, 2)]


def test_unchanged_state_plans_nothing():
    kernel = {WEB.key: WEB, FOREIGN.key: FOREIGN}
    assert plan([(WEB, [dest(1), dest(2)])], kernel, {WEB.key: by_key(dest(2), dest(1))}, {WEB.key}) == []


def test_changes_within_a_service_add_and_edit_before_deleting():
    desired = [(svc("10.90.0.1", "rr"), [dest(1, weight=3), dest(3)])]
    ops = plan(desired, {WEB.key: WEB}, {WEB.key: by_key(dest(1), dest(2))}, {WEB.key})
    assert kinds(ops) == [("edit-service", 1, None), ("edit-dest", 1, 1), ("add-dest", 1, 3), ("delete-dest", 1, 2)]
    assert ops[1].dest.weight == 3


def test_forwarding_change_is_an_edit():
    ops = plan([(WEB, [dest(1, forwarding=2)])], {WEB.key: WEB}, {WEB.key: by_key(dest(1))}, {WEB.key})
    assert kinds(ops) == [("edit-dest", 1, 1)]


def test_owned_service_left_out_is_deleted_last_and_foreign_ones_never_appear():
    kernel = {WEB.key: WEB, DNS.key: DNS, FOREIGN.key: FOREIGN}
    ops = plan([(WEB, [dest(1)])], kernel, {WEB.key: by_key()}, owned={WEB.key, DNS.key})
    assert kinds(ops) == [("add-dest", 1, 1), ("delete-service", 2, None)]
    assert all(op.service.key != FOREIGN.key for op in ops)


def test_owned_service_already_gone_is_not_deleted_again():
    assert plan([], {FOREIGN.key: FOREIGN}, {}, owned={WEB.key}) == []


def test_desired_service_made_by_someone_else_is_edited_to_match():
    kernel = {WEB.key: svc("10.90.0.1", "lc")}
    ops = plan([(WEB, [dest(1)])], kernel, {WEB.key: by_key(dest(7))}, owned=set())
    assert kinds(ops) == [("edit-service", 1, None), ("add-dest", 1, 1), ("delete-dest", 1, 7)]


def test_ipv4_and_ipv6_services_on_the_same_port_are_distinct():
    v6 = svc("fd90::1")
    ops = plan([(WEB, []), (v6, [])], {WEB.key: WEB}, {WEB.key: by_key()}, {WEB.key})
    assert [(op.kind.value, op.service) for op in ops] == [("add-service", v6)]
