import ipaddress

from ipvslb import health, udpwatch

A = (ipaddress.ip_address("10.0.0.1"), 53)
B = (ipaddress.ip_address("10.0.0.2"), 53)
C = (ipaddress.ip_address("10.0.0.3"), 53)


def test_requests_without_replies_are_a_soft_failure_and_replies_a_success():
    previous = {A: (10, 10), B: (10, 10), C: (5, 5)}
    current = {A: (14, 10), B: (14, 13), C: (5, 5)}
    evidence = udpwatch.judge(previous, current, t=7.0)
    assert evidence == [health.UdpNoReply(A, 7.0, "4 packets sent, none came back"), health.UdpReplied(B, 7.0)]


def test_new_or_reset_counters_are_not_judged():
    assert udpwatch.judge({}, {A: (100, 0)}, 1.0) == []
    assert udpwatch.judge({A: (100, 50)}, {A: (3, 0)}, 1.0) == []
