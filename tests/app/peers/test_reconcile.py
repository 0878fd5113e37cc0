"""The reconcile watcher: when it syncs, and what it sends."""
import base64
import ipaddress
import os
import sqlite3
import time

import pytest

from app.peers import reconcile, store
from tests.conftest import POOL6, SERVER_KEY, make_key
from wghelper import validate


def connect(client, auth, n):
    for i in range(n):
        assert client.post("/wireguard/connect", json={"publicKey": make_key(i)},
                           headers=auth("u", "d%d" % i)).status_code == 200


def syncs(helper):
    return [call for call in helper.calls if call[0] == "sync"]


def test_first_round_syncs_the_whole_database(app, client, auth, fake_helper):
    connect(client, auth, 3)
    fake_helper.peers.clear()  # as if the interface had been re-created empty
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    assert watcher.check_once() is not None
    assert sorted(fake_helper.peers) == sorted(make_key(i) for i in range(3))
    assert fake_helper.peers[make_key(0)]["allowed_ips"] == ["10.8.0.2/32", "fd00:8::2/128"]


def test_the_sync_says_when_its_rows_were_read(app, client, auth, fake_helper):
    """The helper leaves alone what an apply changed after `since` (wghelper/writer.py changed_since): it
    is a reading of the host's monotonic clock, taken under the lock with the rows, before the sync."""
    connect(client, auth, 2)
    before = time.monotonic()
    reconcile.Watcher(app.config, helper=fake_helper).check_once()
    after = time.monotonic()
    assert len(fake_helper.sync_since) == 1 and before <= fake_helper.sync_since[0] <= after


def test_rows_with_keys_no_peer_may_use_are_quarantined_not_synced(app, client, auth, fake_helper):
    """Rows from before keys were checked: the helper refuses a sync that holds one, so they stay off."""
    connect(client, auth, 3)
    db = sqlite3.connect(app.config["DB_PATH"])
    with db:
        db.execute("UPDATE peers SET public_key = ? WHERE addr = (SELECT min(addr) FROM peers)", (SERVER_KEY,))
        db.execute("UPDATE peers SET public_key = ? WHERE public_key = ?", (base64.b64encode(bytes(32)).decode(),
                                                                             make_key(2)))
    fake_helper.peers.clear()
    reconcile.Watcher(app.config, helper=fake_helper).check_once()
    assert list(fake_helper.peers) == [make_key(1)]
    assert db.execute("SELECT count(*) FROM peers WHERE quarantined_at IS NOT NULL").fetchone() == (2,)
    db.close()


def test_endpoints_the_helper_refuses_are_forgotten_not_synced(app, client, auth, fake_helper):
    """Rows from before the helper refused loopback and broadcast endpoints (issue 23): one in the sync
    would make the helper refuse every peer, so reconcile forgets them and syncs the rest."""
    connect(client, auth, 3)
    db = sqlite3.connect(app.config["DB_PATH"])
    with db:
        db.execute("UPDATE peers SET endpoint = '127.0.0.1:22' WHERE public_key = ?", (make_key(0),))
        db.execute("UPDATE peers SET endpoint = '[::ffff:127.0.0.1]:22', last_endpoint = '255.255.255.255:1' "
                   "WHERE public_key = ?", (make_key(1),))
        # The control: good endpoints stay, a tunnel client's loopback last endpoint too.
        db.execute("UPDATE peers SET endpoint = '198.51.100.9:51820', last_endpoint = '127.0.0.1:40000' "
                   "WHERE public_key = ?", (make_key(2),))
    fake_helper.peers.clear()
    reconcile.Watcher(app.config, helper=fake_helper).check_once()
    sent = syncs(fake_helper)[-1][1]
    pools = [(ipaddress.ip_network("10.8.0.0/16"), ipaddress.ip_address("10.8.0.1")),
             (ipaddress.ip_network(POOL6), ipaddress.ip_address(fake_helper.pools["gateway6"]))]
    validate.peers(sent, pools)  # what the real helper checks first: it would take this sync
    by_key = {p["public_key"]: p for p in sent}
    assert [by_key[make_key(i)]["endpoint"] for i in range(3)] == [None, None, "198.51.100.9:51820"]
    assert "last_endpoint" not in by_key[make_key(1)] and by_key[make_key(2)]["last_endpoint"] == "127.0.0.1:40000"
    assert db.execute("SELECT endpoint, last_endpoint FROM peers ORDER BY addr").fetchall() == [
        (None, None), (None, None), ("198.51.100.9:51820", "127.0.0.1:40000")]
    db.close()


def test_same_generation_is_not_synced_again_until_interval(app, fake_helper):
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    watcher.check_once()
    second = reconcile.Watcher(app.config, helper=fake_helper)  # another worker
    second._eager = False
    assert second.check_once() is None
    assert len(syncs(fake_helper)) == 1


def test_new_generation_is_synced_once(app, fake_helper):
    workers = [reconcile.Watcher(app.config, helper=fake_helper) for _ in range(3)]
    for watcher in workers:
        watcher.check_once()  # each syncs once at start
    assert len(syncs(fake_helper)) == 3
    fake_helper.generation = "gen-2"
    for watcher in workers:
        watcher.check_once()
    assert len(syncs(fake_helper)) == 4


def test_helper_outage_makes_next_round_eager(app, fake_helper):
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    watcher.check_once()
    assert watcher.check_once() is None
    fake_helper.fail = "unavailable"
    watcher.round()  # records the outage instead of raising
    assert watcher.last_error == "HELPER_UNAVAILABLE"
    fake_helper.fail = None
    assert watcher._eager is True
    assert watcher.check_once() is not None


def test_failed_helper_call_schedules_a_full_sync(app, client, auth, fake_helper):
    """The helper may have run a change whose answer was lost: the next round syncs in full."""
    connect(client, auth, 1)  # the worker now knows the server key
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    watcher.check_once()
    assert watcher.check_once() is None
    fake_helper.fail = "unavailable"
    response = client.post("/wireguard/connect", json={"publicKey": make_key(5)}, headers=auth("u", "d5"))
    assert response.status_code == 503
    fake_helper.fail = None
    fake_helper.peers[make_key(5)] = {"public_key": make_key(5)}  # ran, but the answer never came back
    assert watcher.check_once() is not None
    assert make_key(5) not in fake_helper.peers


def test_endpoints_the_interface_saw_are_kept_and_sent_back(app, client, auth, fake_helper):
    """Where a peer was last seen goes into the database, and back to the helper with every sync, which
    uses it only to put back a peer the interface lost (wghelper/peers.py)."""
    connect(client, auth, 2)
    fake_helper.endpoints = {make_key(0): "198.51.100.7:41000"}
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    watcher.check_once()
    db = watcher._connect()
    try:
        assert {p.public_key: p.last_endpoint for p in store.all_peers(db)} == {
            make_key(0): "198.51.100.7:41000", make_key(1): None}
    finally:
        db.close()
    fake_helper.peers.clear()  # the interface was lost
    fake_helper.generation = "gen-2"
    fake_helper.endpoints = {}
    watcher.check_once()
    sent = {p["public_key"]: p for p in syncs(fake_helper)[-1][1]}
    assert sent[make_key(0)]["last_endpoint"] == "198.51.100.7:41000" and sent[make_key(0)]["endpoint"] is None
    assert "last_endpoint" not in sent[make_key(1)]
    db = watcher._connect()
    try:  # an empty interface reports nothing, and nothing is forgotten
        assert store.by_key(db, make_key(0)).last_endpoint == "198.51.100.7:41000"
    finally:
        db.close()


class Learner:
    """The request path's HelperClient, as the watcher sees it: it is only told each hello."""

    def __init__(self):
        self.hellos = []

    def learn(self, hello):
        self.hellos.append(hello)


def test_a_helper_restarted_in_another_ipv6_mode_converges_every_peer(app, client, auth, fake_helper):
    """Started without IPv6 forwarding (mode local) the peers lose their /128s, and get them back when it
    starts with forwarding again; the request path learns each mode from the watcher's hello."""
    connect(client, auth, 2)
    learner = Learner()
    watcher = reconcile.Watcher(app.config, helper=fake_helper, learner=learner)
    watcher.check_once()
    assert fake_helper.peers[make_key(0)]["allowed_ips"] == ["10.8.0.2/32", "fd00:8::2/128"]
    for mode, generation, ips in (("local", "gen-2", ["10.8.0.2/32"]),
                                  ("forward", "gen-3", ["10.8.0.2/32", "fd00:8::2/128"])):
        fake_helper.pools["ipv6"], fake_helper.generation = mode, generation  # a helper restart
        assert watcher.check_once() is not None
        assert fake_helper.peers[make_key(0)]["allowed_ips"] == ips
        assert fake_helper.peers[make_key(1)]["allowed_ips"][0] == "10.8.0.3/32" and len(
            fake_helper.peers[make_key(1)]["allowed_ips"]) == len(ips)
        assert (learner.hellos[-1]["ipv6"], learner.hellos[-1]["generation"]) == (mode, generation)


def test_each_workers_watcher_tells_its_request_path(settings, monkeypatch):
    """init_app hands the watcher the app's own HelperClient to tell (not a second one of its own)."""
    from app import create_app
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    app = create_app(dict(settings, RECONCILE_CHECK_INTERVAL=3600))
    watcher = app.extensions["orbmesh_watcher"]
    try:
        assert watcher.learner is app.extensions["orbmesh_helper"] and watcher.helper is not watcher.learner
    finally:
        # The usage collector starts beside the watcher; left running it would log into every later test.
        for job in (watcher, app.extensions.get("orbmesh_usage")):
            if job is not None:
                job.stop()


def test_what_commits_while_the_sync_runs_is_not_undone_by_it(app, client, auth, fake_helper):
    """The sync runs without the write lock: a connect and a disconnect that commit (and reach the
    interface) while it runs, before the helper plans from the rows read earlier, are put right after."""
    connect(client, auth, 2)
    real_sync = fake_helper.sync

    def slow_sync(peers, since=None):
        assert client.post("/wireguard/connect", json={"publicKey": make_key(5)},
                           headers=auth("u", "d5")).status_code == 200
        assert client.post("/wireguard/disconnect", json={}, headers=auth("u", "d0")).status_code == 200
        return real_sync(peers, since)  # plans from the rows read before: would re-add d0 and drop d5
    fake_helper.sync = slow_sync
    reconcile.Watcher(app.config, helper=fake_helper).check_once()
    assert sorted(fake_helper.peers) == sorted([make_key(1), make_key(5)])


def test_a_failed_sync_makes_every_worker_sync_again(app, client, auth, fake_helper):
    connect(client, auth, 1)
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    watcher.check_once()
    fake_helper.generation = "gen-2"
    fake_helper.fail = "failed"
    watcher.round()
    fake_helper.fail = None
    other = reconcile.Watcher(app.config, helper=fake_helper)
    other._eager = False  # another worker, past its first round
    assert other.check_once() is not None  # the generation was not left marked as synced


@pytest.fixture
def periodic(app, fake_helper):
    """A watcher past its first sync, with the drift check and the sweep each every 300 s, and set(db,
    drift_age, sweep_age) saying how long ago each last ran."""
    app.config.update(RECONCILE_INTERVAL=300.0, SWEEP_INTERVAL=300.0, STALE_AFTER=86400.0, USAGE_INTERVAL=2.0)
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    watcher.check_once()
    db = sqlite3.connect(app.config["DB_PATH"])

    def ran(drift_age, sweep_age):
        now = time.time()
        with db:
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                           "value = excluded.value", [("reconciled_at", now - drift_age), ("swept_at", now - sweep_age)])
        fake_helper.calls.clear()

    yield watcher, ran
    db.close()


def reads(helper):
    """What the round read of the interface: its dumps, and its counts with whether they asked a new dump."""
    return [c if c[0] == "dump" else ("usage", c[2]) for c in helper.calls if c[0] in ("dump", "usage")]


@pytest.mark.parametrize("drift_age, sweep_age", [(281, 301), (301, 281)], ids=["sweep-first", "drift-first"])
def test_the_drift_check_and_the_sweep_share_one_dump(periodic, fake_helper, drift_age, sweep_age):
    """On wireguard-go a dump holds every change of the interface (1-1.5 s at 60,000 peers): whichever
    falls due first brings the other forward, and the sweep counts from the drift check's dump."""
    watcher, ran = periodic
    ran(drift_age, sweep_age)
    watcher.round()
    assert reads(fake_helper) == [("dump",), ("usage", False)]
    ran(0, 0)
    watcher.round()  # neither is due again
    assert reads(fake_helper) == []


def test_a_sweep_alone_still_counts_from_a_new_dump(periodic, app, fake_helper):
    watcher, ran = periodic
    app.config["SWEEP_INTERVAL"] = 60.0  # they share a round every fifth sweep
    ran(60, 61)  # the drift check is due in 240 s, more than half the sweep's interval
    watcher.round()
    assert reads(fake_helper) == [("usage", True)]


def test_a_drift_check_alone_does_not_bring_a_recent_sweep_forward(periodic, fake_helper):
    watcher, ran = periodic
    ran(301, 10)
    watcher.round()
    assert reads(fake_helper) == [("dump",)]


def test_without_the_sweep_the_drift_check_keeps_its_interval(periodic, app, fake_helper):
    watcher, ran = periodic
    app.config["STALE_AFTER"] = 0
    ran(281, 301)
    watcher.round()
    assert reads(fake_helper) == []


def test_a_worker_leaves_the_sweep_to_the_one_whose_drift_check_brought_it_forward(periodic, app, fake_helper):
    """Two workers' rounds a moment apart: the second must not sweep on a dump of its own while the first
    is still reading the drift check's; it does once the first has had half an interval to."""
    watcher, ran = periodic
    ran(301, 301)
    other = reconcile.Watcher(app.config, helper=fake_helper)
    other._eager = False
    drift_check = fake_helper.dump

    def meanwhile():  # the other worker's round, while this worker's drift check reads the dump
        other.round()
        return drift_check()
    fake_helper.dump = meanwhile
    watcher.round()
    assert reads(fake_helper) == [("dump",), ("usage", False)]
    fake_helper.dump = drift_check
    db = sqlite3.connect(app.config["DB_PATH"])
    with db:  # the first worker took the drift check more than SWEEP_GRACE ago and never swept
        db.execute("UPDATE meta SET value = ? WHERE key = 'reconciled_at'", (time.time() - reconcile.SWEEP_GRACE - 1,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'swept_at'", (time.time() - 301,))
    db.close()
    fake_helper.calls.clear()
    other.round()
    assert reads(fake_helper) == [("usage", True)]
