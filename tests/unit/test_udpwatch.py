import ipaddress

from ipvslb import health, udpwatch

A = (ipaddress.ip_address("10.0.0.1"), 53)
B = (ipaddress.ip_address("10.0.0.2"), 53)
C = (ipaddress.ip_address("10.0.0.3"), 53)


def readings(watch, steps):
    """Feed (t, counters) readings; returns the evidence of each."""
    return [watch.judge(counters, t) for t, counters in steps]


def test_replies_are_a_success_and_idle_backends_say_nothing():
    watch = udpwatch.ReplyWatch(window=1.0)
    assert watch.interval == 0.25
    out = readings(watch, [(0.0, {A: (10, 10), C: (5, 5)}), (0.25, {A: (14, 13), C: (5, 5)})])
    assert out == [[], [health.UdpReplied(A, 0.25)]]


def test_silence_is_judged_one_window_after_the_first_unanswered_reading_whatever_the_phase():
    watch = udpwatch.ReplyWatch(window=1.0)
    steps = [(0.0, {A: (10, 10)}),
             (0.25, {A: (12, 12)}),   # answered
             (0.5, {A: (13, 12)}),    # the backend went silent: first unanswered request seen
             (0.75, {A: (14, 12)}),
             (1.0, {A: (15, 12)}),
             (1.25, {A: (16, 12)}),
             (1.5, {A: (17, 12)})]    # a whole window since 0.5
    out = readings(watch, steps)
    assert out[:6] == [[], [health.UdpReplied(A, 0.25)], [], [], [], []]
    assert out[6] == [health.UdpNoReply(A, 1.5, "5 packets sent, none came back")]


def test_one_failure_per_window_of_silence_and_a_late_reply_clears_it():
    watch = udpwatch.ReplyWatch(window=1.0)
    t, sent, out = 0.0, 0, []
    watch.judge({A: (0, 0)}, t)
    for _ in range(9):  # 2.25 s of requests, no reply
        t, sent = t + 0.25, sent + 5
        out += watch.judge({A: (sent, 0)}, t)
    assert [e.t for e in out] == [1.25, 2.25]
    assert watch.judge({A: (sent, 1)}, t + 0.25) == [health.UdpReplied(A, t + 0.25)]
    assert watch.judge({A: (sent, 1)}, t + 2.0) == []  # nothing sent since: nothing to judge


def test_a_single_unanswered_request_is_judged_even_when_no_other_follows():
    watch = udpwatch.ReplyWatch(window=1.0)
    watch.judge({A: (3, 3)}, 0.0)
    assert watch.judge({A: (4, 3)}, 0.25) == []
    assert watch.judge({A: (4, 3)}, 1.0) == []
    assert watch.judge({A: (4, 3)}, 1.25) == [health.UdpNoReply(A, 1.25, "1 packets sent, none came back")]


def test_a_reply_in_the_same_reading_as_the_request_leaves_nothing_pending():
    watch = udpwatch.ReplyWatch(window=1.0)
    watch.judge({A: (0, 0)}, 0.0)
    assert watch.judge({A: (1, 1)}, 0.25) == [health.UdpReplied(A, 0.25)]
    assert watch.judge({A: (1, 1)}, 5.0) == []


def test_new_or_reset_counters_are_not_judged():
    watch = udpwatch.ReplyWatch(window=1.0)
    assert watch.judge({A: (100, 0)}, 0.0) == []
    assert watch.judge({A: (3, 0), B: (7, 0)}, 0.25) == []  # A reset, B new
    assert watch.judge({A: (4, 0), B: (8, 0)}, 1.25) == []  # windows start at 1.25
    assert watch.judge({A: (4, 0), B: (8, 0)}, 2.25) == [
        health.UdpNoReply(A, 2.25, "1 packets sent, none came back"),
        health.UdpNoReply(B, 2.25, "1 packets sent, none came back")]
