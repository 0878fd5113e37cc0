"""The status cache: exact peer count after every change, stale traffic counters refreshed behind."""
import threading
import time

import pytest

from wghelper.statuscache import StatusCache

from .fakes import Helper, key, peer


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Counting:
    def __init__(self, delay=0.0):
        self.calls = 0
        self.delay = delay

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        return {"n": self.calls}


def wait_until(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_fresh_value_is_reused_for_the_same_key():
    clock, compute = Clock(), Counting()
    cache = StatusCache(refresh=1, max_age=30, clock=clock)
    assert cache.get("k", compute) == {"n": 1}
    clock.now += 0.5
    assert cache.get("k", compute) == {"n": 1}
    assert compute.calls == 1


def test_a_new_key_dumps_at_once():
    clock, compute = Clock(), Counting()
    cache = StatusCache(refresh=1, max_age=30, clock=clock)
    cache.get(("gen", 1), compute)
    assert cache.get(("gen", 2), compute) == {"n": 2}


def test_stale_value_is_answered_and_refreshed_in_the_background():
    clock, compute = Clock(), Counting()
    cache = StatusCache(refresh=1, max_age=30, clock=clock)
    cache.get("k", compute)
    clock.now += 5
    assert cache.get("k", compute) == {"n": 1}  # no wait for the dump
    wait_until(lambda: cache.get("k", compute) == {"n": 2})
    assert compute.calls == 2


def test_too_old_value_is_never_answered():
    clock, compute = Clock(), Counting()
    cache = StatusCache(refresh=1, max_age=30, clock=clock)
    cache.get("k", compute)
    clock.now += 31
    assert cache.get("k", compute) == {"n": 2}


def test_concurrent_callers_share_one_dump():
    compute = Counting(delay=0.2)
    cache = StatusCache(refresh=10, max_age=30)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k", compute))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compute.calls == 1 and got == [{"n": 1}] * 8


def test_an_offered_value_is_kept_only_when_newer():
    clock, compute = Clock(), Counting()
    cache = StatusCache(refresh=1, max_age=30, clock=clock)
    cache.offer(("gen", 1), 100.0, {"n": "offered"}, 0.2)
    assert cache.get(("gen", None), compute) == {"n": "offered"} and compute.calls == 0
    cache.offer(("gen", 1), 99.0, {"n": "older"}, 0.2)
    assert cache.get(("gen", None), compute) == {"n": "offered"}
    assert cache.get(("gen", 2), compute) == {"n": 1}  # it saw change 1 only: no exact count after change 2


def test_a_failed_dump_is_raised_and_not_cached():
    cache = StatusCache(refresh=1, max_age=30)

    def broken():
        raise RuntimeError("wg failed")

    with pytest.raises(RuntimeError):
        cache.get("k", broken)
    assert cache.get("k", Counting()) == {"n": 1}


@pytest.fixture
def helper(tmp_path):
    h = Helper(tmp_path).start()
    yield h
    h.writer.stop()


def test_status_counts_every_change_made_through_the_helper(helper):
    assert helper.result("status")["peer_count"] == 0
    helper.result("apply_peers", {"add": [peer(key(1)), peer(key(2), "10.8.0.3/32")]})
    assert helper.result("status")["peer_count"] == 2
    helper.result("apply_peers", {"remove": [key(1)]})
    assert helper.result("status")["peer_count"] == 1
    # The first dump taught the writer the keys; it counts every change since without one.
    dumps = [c for c in helper.runner.calls if c[:2] == ["wg", "show"]]
    assert len(dumps) == 1


def test_a_failed_change_makes_the_count_come_from_a_dump_again(helper):
    helper.result("apply_peers", {"add": [peer(key(1))]})
    assert helper.result("status")["peer_count"] == 1
    helper.runner.fail = lambda argv: "boom" if argv[:2] == ["wg", "set"] else None
    assert not helper.call("apply_peers", {"add": [peer(key(2), "10.8.0.3/32")]})["ok"]
    helper.runner.fail = None
    assert helper.writer.peer_count(helper.iface.generation) is None
    helper.result("status")
    assert len([c for c in helper.runner.calls if c[:2] == ["wg", "show"]]) == 2


def test_a_dump_while_a_change_runs_teaches_nothing(helper):
    version = helper.writer.version
    helper.result("apply_peers", {"add": [peer(key(1))]})
    helper.writer.learn([], helper.iface.generation, version)  # a dump that started before that change
    assert helper.writer.peer_count(helper.iface.generation) is None
    assert helper.result("status")["peer_count"] == 1


def test_status_reuses_the_dump_while_nothing_changed(helper):
    for _ in range(5):
        assert helper.result("status")["peer_count"] == 0
    assert len([c for c in helper.runner.calls if c[:2] == ["wg", "show"]]) == 1


def test_a_new_interface_generation_dumps_again(helper):
    helper.result("status")
    helper.iface.generation = "another"
    helper.result("status")
    assert len([c for c in helper.runner.calls if c[:2] == ["wg", "show"]]) == 2


def test_status_while_a_change_runs_counts_what_was_done_before_it_without_a_dump(helper):
    """Under steady connects a wg set runs most of the time: a status then answers the count of the last
    finished one (the running one's requests have no answer yet) instead of dumping the interface."""
    import threading
    helper.result("apply_peers", {"add": [peer(key(1))]})
    assert helper.result("status")["peer_count"] == 1  # the one dump: the writer learns the keys
    helper.result("apply_peers", {"add": [peer(key(2), "10.8.0.3/32")]})  # counted, no dump
    assert helper.result("status")["peer_count"] == 2
    dumps = len([c for c in helper.runner.calls if c[:2] == ["wg", "show"]])
    helper.runner.gate = threading.Event()
    running = threading.Thread(target=helper.result, args=("apply_peers", {"add": [peer(key(3), "10.8.0.4/32")]}))
    running.start()
    try:
        assert helper.runner.entered.wait(5)
        assert helper.result("status")["peer_count"] == 2
        assert len([c for c in helper.runner.calls if c[:2] == ["wg", "show"]]) == dumps
    finally:
        helper.runner.gate.set()
        running.join(5)
    assert helper.result("status")["peer_count"] == 3
