"""Per-peer counters for the app's accounting (wghelper/usage.py), and the usage and limits commands."""
import threading
import time

import pytest

from wghelper import limits, usage
from wghelper.firewall import Firewall
from wghelper.usage import Samples

from .fakes import Helper, key, peer

BOOT = "12345678-aaaa-bbbb-cccc-1234567890ab"
OTHER_BOOT = "87654321-aaaa-bbbb-cccc-1234567890ab"


def dumped(*rows):
    return [{"public_key": k, "rx_bytes": rx, "tx_bytes": tx, "latest_handshake": hs, "endpoint": ep}
            for k, rx, tx, hs, ep in rows]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_only_what_changed_since_the_last_sample_comes_back():
    clock = Clock()
    samples = Samples(BOOT, clock)
    dumps = iter([("5", dumped((key(1), 10, 20, 0, None), (key(2), 0, 0, 0, None))),
                  ("5", dumped((key(1), 10, 20, 0, None), (key(2), 7, 0, 1, "192.0.2.9:5")))])
    first = samples.sample(lambda: next(dumps))
    assert first["complete"] and first["taken_at"] == 100.0 and first["epoch"] == "5" and first["boot"] == BOOT
    assert sorted(first["peers"]) == sorted([[key(1), 10, 20, 0, None], [key(2), 0, 0, 0, None]])
    clock.now = 100.5  # younger than REFRESH: the same sample, nothing new since it
    assert samples.sample(lambda: pytest.fail("dumped"), {"boot": BOOT, "taken_at": 100.0})["peers"] == []
    clock.now = 102.0
    second = samples.sample(lambda: next(dumps), {"boot": BOOT, "taken_at": 100.0})
    assert second["peers"] == [[key(2), 7, 0, 1, "192.0.2.9:5"]] and not second["complete"]
    # Another boot (or no since at all): everything.
    assert len(samples.sample(lambda: None, {"boot": OTHER_BOOT, "taken_at": 100.0})["peers"]) == 2


def test_a_new_epoch_reports_every_peer_again():
    clock = Clock()
    samples = Samples(BOOT, clock)
    samples.record(100.0, "5", dumped((key(1), 10, 20, 0, None)))
    samples.record(101.0, "6", dumped((key(1), 10, 20, 0, None)))  # same values, but the link was made again
    assert samples.sample(lambda: None, {"boot": BOOT, "taken_at": 100.0})["peers"] == [[key(1), 10, 20, 0, None]]


def test_an_older_dump_never_replaces_a_newer_one():
    clock = Clock()
    samples = Samples(BOOT, clock)
    samples.record(105.0, "5", dumped((key(1), 50, 50, 0, None)))
    samples.record(104.0, "5", dumped((key(1), 40, 40, 0, None)))  # a slow background dump that started earlier
    clock.now = 105.5
    assert samples.sample(lambda: None)["peers"] == [[key(1), 50, 50, 0, None]]


def test_fresh_dumps_now_and_concurrent_callers_share_nothing_stale():
    clock = Clock()
    samples = Samples(BOOT, clock)
    calls = []

    def dump():
        calls.append(clock.now)
        return "5", dumped((key(1), len(calls), 0, 0, None))

    samples.sample(dump)
    clock.now = 100.2
    assert samples.sample(dump)["peers"][0][1] == 1 and len(calls) == 1
    assert samples.sample(dump, fresh=True)["peers"][0][1] == 2 and samples.taken_at == 100.2


def test_a_sample_serves_later_callers_for_ten_times_what_its_dump_took():
    # The drift check's dump (1-1.5 s of the interface at 60,000 peers on wireguard-go) serves the sweep's
    # count a few seconds later; a caller that asks for a fresh one still gets a new dump.
    clock = Clock()
    samples = Samples(BOOT, clock)
    samples.record(100.0, "5", dumped((key(1), 10, 0, 0, None)), seconds=1.2)
    clock.now = 100.0 + 11.9
    assert samples.sample(lambda: pytest.fail("dumped"))["taken_at"] == 100.0
    clock.now = 100.0 + usage.REUSE * 1.2
    assert samples.sample(lambda: ("5", dumped((key(1), 20, 0, 0, None))))["taken_at"] == clock.now
    # A cheap dump is reused no longer than REFRESH.
    samples.record(200.0, "5", dumped((key(1), 30, 0, 0, None)), seconds=0.01)
    clock.now = 200.0 + usage.REFRESH
    assert samples.sample(lambda: ("5", dumped((key(1), 40, 0, 0, None))))["taken_at"] == clock.now
    clock.now += 0.5
    assert samples.sample(lambda: ("5", dumped((key(1), 50, 0, 0, None))), fresh=True)["peers"][0][1] == 50


def test_a_peer_that_never_did_anything_is_no_change_until_it_does():
    # After a bulk add, a helper restart or a new link: not 50,000 idle rows to a worker (the app has no
    # baseline for them, or counts from zero when it sees them move).
    clock = Clock()
    samples = Samples(BOOT, clock)
    samples.record(100.0, "5", dumped((key(1), 10, 20, 0, None)))
    since = {"boot": BOOT, "taken_at": 100.0}
    samples.record(101.0, "5", dumped((key(1), 10, 20, 0, None), (key(2), 0, 0, 0, None)))
    assert samples.sample(lambda: None, since)["peers"] == []
    assert len(samples.sample(lambda: None)["peers"]) == 2  # a caller without a since still gets every peer
    samples.record(102.0, "6", dumped((key(1), 10, 20, 0, None), (key(2), 0, 0, 0, None)))  # a new link
    assert samples.sample(lambda: None, since)["peers"] == [[key(1), 10, 20, 0, None]]
    samples.record(103.0, "6", dumped((key(1), 0, 0, 0, None), (key(2), 0, 0, 0, "192.0.2.9:5")))
    moved = samples.sample(lambda: None, {"boot": BOOT, "taken_at": 102.0})["peers"]
    assert sorted(moved) == sorted([[key(1), 0, 0, 0, None], [key(2), 0, 0, 0, "192.0.2.9:5"]])  # a reset too


class Ticking:
    """A clock that moves on at each reading and remembers which thread read it."""

    def __init__(self):
        self.now, self.readers = 100.0, []

    def __call__(self):
        self.now += 0.01
        self.readers.append(threading.current_thread().name)
        return self.now


def test_fresh_callers_waiting_together_share_the_next_dump():
    # The app settles before each disconnect: those that arrive while a dump runs need one begun after
    # they asked, and one is enough for all of them.
    clock = Ticking()
    samples = Samples(BOOT, clock)
    started, release, dumps = threading.Event(), threading.Event(), []

    def dump():
        dumps.append(clock.now)
        if len(dumps) == 1:
            started.set()
            release.wait(5)
        return "5", dumped((key(1), len(dumps), 0, 0, None))

    first = threading.Thread(target=samples.sample, args=(dump,), kwargs={"fresh": True})
    first.start()
    assert started.wait(5)
    answers = []
    names = ["waiter-%d" % i for i in range(3)]
    waiting = [threading.Thread(target=lambda: answers.append(samples.sample(dump, fresh=True)), name=name)
               for name in names]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 5
    while not set(names) <= set(clock.readers) and time.monotonic() < deadline:
        time.sleep(0.01)  # each has asked (read the clock) while the first dump runs
    release.set()
    for thread in [first, *waiting]:
        thread.join(5)
    assert len(dumps) == 2
    assert [a["peers"][0][1] for a in answers] == [2, 2, 2] and len({a["taken_at"] for a in answers}) == 1


def test_boot_id_is_read_from_the_kernel():
    assert usage.read_boot_id().count("-") == 4


# --- the commands, through dispatch ---------------------------------------------------------

@pytest.fixture
def helper(tmp_path):
    h = Helper(tmp_path).start()
    h.ctx.samples = Samples(BOOT)
    firewall = Firewall(h.settings, h.cmd)
    h.writer.firewall = firewall
    yield h
    h.writer.stop()


def test_usage_command_reads_the_interface(helper):
    helper.result("apply_peers", {"add": [peer(key(1)), peer(key(2), "10.8.0.3/32")]})
    helper.runner.clear()
    got = helper.result("usage", {})
    assert helper.runner.calls == [["wg", "show", "wgt0", "dump"]]
    assert sorted(got["peers"]) == sorted([[key(1), 100, 200, 0, None], [key(2), 100, 200, 0, None]])
    assert got["epoch"] == str(helper.iface.index) and got["boot"] == BOOT and got["complete"]
    since = {"boot": BOOT, "taken_at": got["taken_at"]}
    assert helper.result("usage", {"since": since})["peers"] == []  # nothing changed, and no new dump
    assert helper.runner.calls == [["wg", "show", "wgt0", "dump"]]


@pytest.mark.parametrize("backend, blocks", [("wireguard-go", True), ("kernel", False)])
def test_usage_says_whether_its_dump_held_the_interface(helper, backend, blocks):
    helper.iface.backend = backend
    assert helper.result("usage", {})["dump_blocks"] is blocks


def test_status_dumps_feed_the_usage_samples(helper):
    helper.result("apply_peers", {"add": [peer(key(1))]})
    helper.result("status")
    helper.runner.clear()
    assert helper.result("usage", {})["peers"] == [[key(1), 100, 200, 0, None]]
    assert helper.runner.calls == []  # the status dump was young enough


def test_every_dump_serves_status_and_usage_alike(helper):
    # Each dump holds wireguard-go's IPC lock while every `wg set` waits: the usage command's, the drift
    # check's and the sweep's (dump_peers) spare status its own, and the other way round.
    helper.result("apply_peers", {"add": [peer(key(1))]})
    helper.runner.clear()
    helper.result("usage", {})
    assert helper.result("status")["rx_bytes"] == 100
    helper.result("dump_peers")
    assert helper.result("usage", {})["peers"] == [[key(1), 100, 200, 0, None]]
    assert helper.runner.calls == [["wg", "show", "wgt0", "dump"]] * 2  # usage's, dump_peers'; none for status


def test_limits_command_writes_the_table(helper):
    got = helper.result("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.2"], "rate_mbps": 20}]})
    assert got == {"users": 1, "addresses": 1, "tiers": [20], "quotas": 0}
    assert "\tmap plan4 {\n\t\ttype ipv4_addr : mark\n\t\telements = { 10.8.0.2 : 20 }\n" in \
        helper.runner.nft_tables["inet orbmesh"]
    assert "u1" not in helper.runner.nft_tables["inet orbmesh"]  # no user id in the table
    reply = helper.call("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.1"], "rate_mbps": 20}]})
    assert reply["error"]["code"] == "INVALID_ARGUMENT" and reply["error"]["details"] == {
        "field": "users[0].addresses[0]"}


def test_usage_names_the_users_whose_quota_object_is_used_up(helper):
    helper.result("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.2"], "quota": 1000}]})
    assert helper.result("usage", {})["over_quota"] == []
    plan = helper.writer.firewall.plans["u1"]
    helper.runner.quota_used = {limits.quota_name("u1", plan): 961}
    assert helper.result("usage", {})["over_quota"] == ["u1"]


def test_limits_failure_is_command_failed_and_leaves_the_table(helper):
    helper.result("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.2"], "rate_mbps": 20}]})
    table = helper.runner.nft_tables["inet orbmesh"]
    helper.runner.fail = lambda argv: "Error: boom" if argv[0] == "nft" else None
    reply = helper.call("limits", {"users": [{"user": "u2", "addresses": ["10.8.0.3"], "rate_mbps": 5}]})
    assert reply["error"]["code"] == "COMMAND_FAILED"
    assert helper.runner.nft_tables["inet orbmesh"] == table
