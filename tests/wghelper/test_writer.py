"""The writer (wghelper/writer.py): concurrent changes merged into few `wg set` calls and nft runs, failures
kept apart."""
import threading
import time

import pytest

from wghelper import protocol
from wghelper.errors import CommandFailed

from .fakes import FAKE_IF, Helper, key, peer

IF = FAKE_IF
K1, K2 = key(1), key(2)


@pytest.fixture
def helper(tmp_path):
    h = Helper(tmp_path).start()
    yield h
    h.writer.stop()


# --- the writer: coalescing and fallback --------------------------------------

def _blocked_writer(tmp_path):
    """A helper whose writer is stuck inside a first `wg set` until the gate opens."""
    h = Helper(tmp_path).start()
    h.runner.gate = threading.Event()
    first = threading.Thread(target=h.writer.apply, args=([], [peer(key(1000), "10.8.9.9/32")]))
    first.start()
    assert h.runner.entered.wait(5)
    return h, first


def _submit_all(h, jobs):
    results = [None] * len(jobs)

    def run(i, adds):
        try:
            results[i] = h.writer.apply([], adds)
        except CommandFailed as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, adds)) for i, adds in enumerate(jobs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while h.writer.pending() < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert h.writer.pending() == len(jobs)
    return threads, results


def test_concurrent_adds_are_coalesced(tmp_path):
    h, first = _blocked_writer(tmp_path)
    n = 50
    threads, results = _submit_all(h, [[peer(key(i), "10.8.1.%d/32" % i)] for i in range(1, n + 1)])
    h.runner.gate.set()
    for t in threads + [first]:
        t.join(5)
    sets = h.runner.wg_sets()
    assert len(sets) == 2                      # the blocked one, then one for all n
    assert sets[1].count("peer") == n
    assert sets[1][:3] == ["wg", "set", IF]
    assert results == [{"removed": 0, "applied": 1}] * n
    assert (h.writer.wg_set_calls, h.writer.jobs_applied) == (2, n + 1)
    h.writer.stop()


def test_last_operation_on_a_key_wins(tmp_path):
    h, first = _blocked_writer(tmp_path)
    order = [([], [peer(K1, "10.8.0.2/32")]), ([K1], []), ([], [peer(K1, "10.8.0.5/32", keepalive=7)])]
    threads = []
    for removes, adds in order:  # queued one after the other, in this order
        t = threading.Thread(target=h.writer.apply, args=(removes, adds))
        t.start()
        threads.append(t)
        while h.writer.pending() < len(threads):
            time.sleep(0.002)
    h.runner.gate.set()
    for t in threads + [first]:
        t.join(5)
    assert h.runner.wg_sets()[1] == [
        "wg", "set", IF, "peer", K1, "allowed-ips", "10.8.0.5/32", "persistent-keepalive", "7"]
    h.writer.stop()


def test_failed_merge_is_retried_job_by_job(tmp_path):
    h, first = _blocked_writer(tmp_path)
    bad = key(666)
    h.runner.fail = lambda argv: "Invalid key" if bad in argv else None
    jobs = [[peer(K1, "10.8.0.2/32")], [peer(bad, "10.8.0.3/32")], [peer(K2, "10.8.0.4/32")]]
    threads, results = _submit_all(h, jobs)
    h.runner.gate.set()
    for t in threads + [first]:
        t.join(5)
    sets = h.runner.wg_sets()
    assert [s.count("peer") for s in sets] == [1, 3, 1, 1, 1]   # blocked, merged, then one by one
    assert [s[4] for s in sets[2:]] == [K1, bad, K2]
    assert results[0] == {"removed": 0, "applied": 1} and results[2] == {"removed": 0, "applied": 1}
    assert isinstance(results[1], CommandFailed) and results[1].stderr == "Invalid key"
    assert set(h.runner.peers) >= {K1, K2}
    assert h.writer.jobs_applied == 3  # the blocked one, K1 and K2
    h.writer.stop()


class FakeFirewall:
    """Firewall.set_limits as the writer sees it: the batches it was given; a user in `bad` fails one."""

    def __init__(self):
        self.batches = []
        self.bad = set()

    def set_limits(self, batch):
        self.batches.append(batch)
        if any(user in self.bad for users, _ in batch for user in users):
            raise CommandFailed("nft", 1, "Error: bad")
        return {"users": len(batch)}


def test_limits_waiting_together_are_one_nft_run_beside_the_rounds_wg_set_and_a_failure_stays_alone(tmp_path):
    h, first = _blocked_writer(tmp_path)
    h.writer.firewall = fw = FakeFirewall()
    fw.bad.add("u2")
    results = {}

    def call(user):
        try:
            results[user] = h.writer.set_limits({user: {"addresses": ["10.8.0.2"], "rate_mbps": 1}})
        except CommandFailed as exc:
            results[user] = exc

    threads = []
    for user in ("u1", "u2", "u3"):
        threads.append(threading.Thread(target=call, args=(user,)))
        threads[-1].start()
    threads.append(threading.Thread(target=h.writer.apply, args=([], [peer(K1, "10.8.0.5/32")])))
    threads[-1].start()
    deadline = time.monotonic() + 5
    while h.writer.pending() < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    h.runner.gate.set()
    for t in threads + [first]:
        t.join(5)
    assert [len(b) for b in fw.batches] == [3, 1, 1, 1]  # the merged run failed, then one by one
    assert [users for b in fw.batches[1:] for users, _ in b] == [{"u%d" % i: {"addresses": ["10.8.0.2"],
                                                                               "rate_mbps": 1}} for i in (1, 2, 3)]
    assert isinstance(results["u2"], CommandFailed)
    assert results["u1"] == results["u3"] == {"users": 1}
    assert [s.count("peer") for s in h.runner.wg_sets()] == [1, 1]  # the blocked one, then the round's
    h.writer.stop()
    with pytest.raises(Exception):
        h.writer.set_limits({"u9": {"addresses": []}})  # stopped


def test_limits_need_a_firewall(helper):
    reply = helper.call("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.2"], "rate_mbps": 20}]})
    assert reply["error"]["code"] == protocol.INTERFACE_DOWN


def test_stopped_writer_refuses_work(helper):
    helper.writer.stop()
    assert helper.call("apply_peers", {"add": [peer(K1)]})["error"]["code"] == protocol.INTERFACE_DOWN


def test_a_sync_lets_changes_in_between_its_slices_and_a_later_change_wins(tmp_path, monkeypatch):
    """A sync of 60,000 peers is 60 `wg set` calls: a connect waits for one slice, not for all of them,
    and a key it changed is not changed back by the slices still to come."""
    from wghelper import writer as writer_module
    monkeypatch.setattr(writer_module, "SLICE", 2)
    h = Helper(tmp_path).start()
    try:
        h.runner.gate = threading.Event()
        planned = [peer(key(i), "10.8.2.%d/32" % i) for i in range(1, 7)]  # three slices of two
        sync = threading.Thread(target=h.writer.run_planned,
                                args=(lambda: ([], planned, {"added": 6}),))
        sync.start()
        assert h.runner.entered.wait(5)  # inside the first slice's wg set
        done = []
        connect = threading.Thread(target=lambda: done.append(h.writer.apply([key(5)], [])))
        connect.start()
        deadline = time.monotonic() + 5
        while h.writer.pending() < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        h.runner.gate.set()
        sync.join(5)
        connect.join(5)
        sets = h.runner.wg_sets()
        keys = [[a for a in s if a in {key(i) for i in range(1, 7)}] for s in sets]
        # slice 1, then the waiting change, then the rest without key 5 (the later remove wins)
        assert keys == [[key(1), key(2)], [key(5)], [key(3), key(4)], [key(6)]]
        assert "remove" in sets[1] and done == [{"removed": 1, "applied": 0}]
    finally:
        h.writer.stop()


# --- what a sync leaves alone -------------------------------------------------

def test_a_change_is_remembered_for_the_syncs_read_before_it(helper, monkeypatch):
    """changed_since: the keys a plain job changed at or after a clock reading, each with whether its last
    change added it; a failed wg set counts (what
    it did is unknown); after REMEMBER seconds and enough keys, a change is forgotten."""
    from wghelper import writer as writer_module

    clock = [100.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    w = helper.writer
    assert w.changed_since(None) == {} and w.changed_since(0) == {}
    w.apply([], [peer(K1)])
    clock[0] = 200.0
    w.apply([K1], [])
    helper.runner.fail = lambda argv: "boom" if argv[:2] == ["wg", "set"] else None
    with pytest.raises(CommandFailed):
        w.apply([], [peer(K2, "10.8.0.3/32")])
    helper.runner.fail = None
    assert w.changed_since(100.0) == {K1: False, K2: True} and w.changed_since(150.0) == {K1: False, K2: True}
    assert w.changed_since(200.5) == {}
    monkeypatch.setattr(w, "_prune_at", 1)
    clock[0] = 200.0 + writer_module.REMEMBER + 1
    w.apply([], [peer(key(7), "10.8.0.7/32")])
    assert set(w._changed) == {key(7)} and w.changed_since(0) == {key(7): True}
