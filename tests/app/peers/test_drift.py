"""The periodic reconcile (app/peers/drift.py): drift found outside the lock, repaired under it, nothing undone."""
import sqlite3

from app import helper as app_helper
from app.peers import drift, reconcile, store
from tests.conftest import make_key


def connect(client, auth, n):
    for i in range(n):
        assert client.post("/wireguard/connect", json={"publicKey": make_key(i)},
                           headers=auth("u", "d%d" % i)).status_code == 200


def first_round(app, fake_helper):
    """The watcher's full sync at start; then a round is due again only after RECONCILE_INTERVAL."""
    watcher = reconcile.Watcher(app.config, helper=fake_helper)
    watcher.check_once()
    return watcher


def age(app, seconds):
    db = sqlite3.connect(app.config["DB_PATH"])
    with db:
        db.execute("UPDATE meta SET value = value - ? WHERE key = 'reconciled_at'", (seconds,))
    db.close()


def calls(fake_helper, name):
    return [c for c in fake_helper.calls if c[0] == name]


def test_a_peer_lost_and_a_stray_are_repaired_without_a_full_sync(app, client, auth, fake_helper):
    connect(client, auth, 3)
    watcher = first_round(app, fake_helper)
    syncs = len(calls(fake_helper, "sync"))
    lost = fake_helper.peers.pop(make_key(1))  # changed behind the helper's back
    fake_helper.peers[make_key(9)] = dict(lost, public_key=make_key(9))
    assert watcher.check_once() is None  # not due yet
    age(app, app.config["RECONCILE_INTERVAL"] + 1)
    assert watcher.check_once() == {"added": 1, "removed": 1}
    assert sorted(fake_helper.peers) == sorted(make_key(i) for i in range(3))
    assert fake_helper.peers[make_key(1)]["allowed_ips"] == lost["allowed_ips"]
    assert len(calls(fake_helper, "sync")) == syncs  # no full sync: only the drift was sent
    assert calls(fake_helper, "apply")[-1][2] == [make_key(9)]


def test_no_drift_sends_no_change(app, client, auth, fake_helper):
    connect(client, auth, 3)
    watcher = first_round(app, fake_helper)
    applies = len(calls(fake_helper, "apply"))
    age(app, app.config["RECONCILE_INTERVAL"] + 1)
    assert watcher.check_once() == {}
    assert len(calls(fake_helper, "apply")) == applies and calls(fake_helper, "dump")


def test_a_wrong_allowed_ip_is_put_right(app, client, auth, fake_helper):
    connect(client, auth, 2)
    watcher = first_round(app, fake_helper)
    fake_helper.peers[make_key(0)] = dict(fake_helper.peers[make_key(0)], allowed_ips=["10.8.7.7/32"])
    age(app, app.config["RECONCILE_INTERVAL"] + 1)
    assert watcher.check_once() == {"updated": 1}
    assert fake_helper.peers[make_key(0)]["allowed_ips"][0] == "10.8.0.2/32"


def test_a_disconnect_between_the_dump_and_the_lock_is_not_undone(app, client, auth, fake_helper, monkeypatch):
    """The row read outside the lock says 'missing from the interface'; the disconnect that committed
    since must win: the peer is not put back."""
    connect(client, auth, 2)
    watcher = first_round(app, fake_helper)
    fake_helper.peers.pop(make_key(1))  # its disconnect took it off ...
    read = store.live_peers_between

    def then_disconnect(db, after, through):
        rows = read(db, after, through)
        # ... and its row goes right after the snapshot outside the lock was read
        assert client.post("/wireguard/disconnect", json={}, headers=auth("u", "d1")).status_code == 200
        return rows
    monkeypatch.setattr(store, "live_peers_between", then_disconnect)
    age(app, app.config["RECONCILE_INTERVAL"] + 1)
    assert watcher.check_once() == {}
    assert list(fake_helper.peers) == [make_key(0)]


def test_one_worker_checks_per_interval(app, client, auth, fake_helper):
    connect(client, auth, 1)
    first_round(app, fake_helper)
    age(app, app.config["RECONCILE_INTERVAL"] + 1)
    generation, interval, hello = fake_helper.generation, app.config["RECONCILE_INTERVAL"], fake_helper.hello()
    db, other = (sqlite3.connect(app.config["DB_PATH"]) for _ in range(2))
    try:
        assert drift.check(db, fake_helper, generation, interval, hello) == {}
        assert drift.check(other, fake_helper, generation, interval, hello) is None
    finally:
        db.close()
        other.close()


def test_a_new_generation_still_gets_the_full_sync(app, client, auth, fake_helper):
    connect(client, auth, 2)
    watcher = first_round(app, fake_helper)
    syncs = len(calls(fake_helper, "sync"))
    fake_helper.generation = "gen-2"
    fake_helper.peers.clear()
    watcher.check_once()
    assert len(calls(fake_helper, "sync")) == syncs + 1 and len(fake_helper.peers) == 2


def test_a_walk_in_pages_finds_what_the_whole_dump_did(app, client, auth, fake_helper, monkeypatch):
    """Pages of two: a peer lost before the first key, one after the last, one in the middle, a stray
    and a wrong address are found whichever page their keys fall in."""
    monkeypatch.setattr(app_helper, "DUMP_PAGE", 2)
    connect(client, auth, 7)
    watcher = first_round(app, fake_helper)
    keys = sorted(fake_helper.peers)
    for lost in (keys[0], keys[3], keys[-1]):
        fake_helper.peers.pop(lost)
    fake_helper.peers[make_key(99)] = dict(fake_helper.peers[keys[1]], public_key=make_key(99))
    fake_helper.peers[keys[4]] = dict(fake_helper.peers[keys[4]], allowed_ips=["10.8.7.7/32"])
    dumps = len(calls(fake_helper, "dump"))
    age(app, app.config["RECONCILE_INTERVAL"] + 1)
    assert watcher.check_once() == {"added": 3, "removed": 1, "updated": 1}
    assert sorted(fake_helper.peers) == keys
    assert len(calls(fake_helper, "dump")) == dumps + 1  # one dump for the whole walk


def test_each_page_reads_only_the_rows_of_its_keys(app, client, auth, fake_helper, monkeypatch):
    monkeypatch.setattr(app_helper, "DUMP_PAGE", 2)
    connect(client, auth, 5)
    watcher = first_round(app, fake_helper)
    read, ranges = store.live_peers_between, []

    def between(db, after, through):
        rows = read(db, after, through)
        ranges.append((after, through, sorted(p.public_key for p in rows)))
        return rows
    monkeypatch.setattr(store, "live_peers_between", between)
    age(app, app.config["RECONCILE_INTERVAL"] + 1)
    assert watcher.check_once() == {}
    keys = sorted(fake_helper.peers)
    assert ranges == [(None, keys[1], keys[0:2]), (keys[1], keys[3], keys[2:4]), (keys[3], None, keys[4:])]
