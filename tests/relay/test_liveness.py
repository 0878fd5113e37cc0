"""The relay's own deadline on a path's answers."""
from orbmesh_relay import liveness
from orbmesh_relay.liveness import Liveness


def test_silence_without_anything_sent_is_never_dead():
    live = Liveness()
    assert not live.dead(1000.0) and not live.needs_check(1000.0)
    live.answered(5.0)
    assert not live.dead(1000.0)


def test_sent_and_unanswered_needs_a_check_then_is_dead():
    live = Liveness()
    live.sent(10.0)
    live.sent(10.5)  # the first unanswered send counts
    assert not live.needs_check(10.2)
    assert live.needs_check(10.0 + liveness.SUSPECT_AFTER)
    live.checked(10.3)
    assert not live.needs_check(10.4)  # at most one check every CHECK_EVERY
    assert live.needs_check(10.3 + liveness.CHECK_EVERY)
    assert not live.dead(10.0 + liveness.DEAD_MIN)
    assert live.dead(10.0 + liveness.DEAD_MIN + 0.01)
    live.answered(11.5)
    assert not live.dead(20.0) and live.silent_for(20.0) == 0.0


def test_a_late_probe_reply_answers_only_what_was_sent_before_the_probe():
    live = Liveness()
    live.sent(10.0)
    live.answered(10.2, asked_at=9.9)  # the probe went before the send: it says nothing of it
    assert live.silent_for(10.5) == 0.5 and live.last_answer == 10.2
    assert live.dead(10.0 + liveness.DEAD_MIN + 0.01)
    live.answered(11.5, asked_at=10.0)  # asked after it: the path carried what was sent before
    assert live.silent_for(11.5) == 0.0


def test_the_deadline_grows_with_the_round_trip_time_within_bounds():
    live = Liveness()
    assert live.deadline() == liveness.DEAD_MIN
    live.sample(0.010)
    assert live.deadline() == liveness.DEAD_MIN  # a fast path keeps the floor
    for _ in range(100):
        live.sample(0.8)
    assert abs(live.srtt - 0.8) < 0.01
    assert abs(live.deadline() - liveness.RTT_FACTOR * 0.8) < 0.05  # a slow path is not declared dead early
    for _ in range(100):
        live.sample(30.0)
    assert live.deadline() == liveness.DEAD_MAX
    live.sample(-1.0)  # a clock step is no sample
    assert live.srtt > 29


def test_reset_forgets_what_was_outstanding_but_keeps_the_rtt():
    live = Liveness()
    live.sample(0.5)
    live.sent(1.0)
    live.checked(1.3)
    live.reset()
    assert live.silent_for(100.0) == 0.0 and live.last_check is None and live.srtt == 0.5
