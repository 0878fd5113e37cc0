"""The stale-peer sweep: quarantine, free, reconnect, once across workers."""
import json
import time

import pytest

from app.helper import peer_spec
from app.ops import metrics
from app.peers import reconcile, store, sweep
from app.peers.allocator import Allocator
from app.peers.audit import AuditLog
from app.peers.db import connect as db_connect
from app.peers.db import write
from tests.conftest import make_key

STALE, QUARANTINE, INTERVAL = 100.0, 50.0, 10.0


@pytest.fixture(params=[2.0, 0], ids=["usage-counted", "dumped"])
def cfg(app, request):
    """Every test twice: handshakes from the usage count the round starts with, and (no counting) a dump."""
    app.config.update(STALE_AFTER=STALE, QUARANTINE=QUARANTINE, SWEEP_INTERVAL=INTERVAL, USAGE_INTERVAL=request.param)
    return app.config


@pytest.fixture
def db(app):
    conn = db_connect(app.config["DB_PATH"])
    yield conn
    conn.close()


def connect(client, auth, i, user="u"):
    response = client.post("/wireguard/connect", json={"publicKey": make_key(i)}, headers=auth(user, "d%d" % i))
    assert response.status_code == 200, response.get_json()
    return response.get_json()["ip"]


def add_orbnet(client, internal, i, ip):
    response = client.post("/wireguard/add-peer", headers=internal, json={
        "userUuid": "orb", "publicKey": make_key(i), "allowedIPs": ip + "/32", "assignedIP": ip})
    assert response.status_code == 200, response.get_json()


def rows(db):
    return {p.public_key: p for p in store.all_peers(db)}


def run(db, helper, cfg, at, audit_log=None):
    return sweep.sweep(db, helper, cfg, audit_log, now=at)


def test_idle_client_is_quarantined_then_freed_orbnet_and_active_peers_stay(app, client, auth, internal,
                                                                            fake_helper, cfg, db, tmp_path):
    t0 = time.time()
    idle_ip = connect(client, auth, 1)
    connect(client, auth, 2)
    add_orbnet(client, internal, 3, "10.8.9.9")
    audit_log = AuditLog(str(tmp_path / "sweep-audit.log"), 1 << 20, 2)
    quarantined_before = metrics.SWEPT_PEERS.labels("quarantined")._value.get()
    assert run(db, fake_helper, cfg, t0, audit_log) == {"quarantined": [], "freed": []}  # sees the interface

    fake_helper.handshakes[make_key(2)] = t0 + STALE  # device 2 is in use
    fake_helper.endpoints[make_key(2)] = "198.51.100.2:5000"
    fake_helper.calls.clear()
    result = run(db, fake_helper, cfg, t0 + STALE + 1, audit_log)
    # While usage counts, the round's one read of the interface is a fresh count (no dump of every peer).
    reads = [c[0] for c in fake_helper.calls if c[0] in ("usage", "dump")]
    assert reads == (["usage"] if cfg["USAGE_INTERVAL"] else ["dump"])
    assert [c[2] for c in fake_helper.calls if c[0] == "usage"] in ([], [True])
    assert [p.public_key for p in result["quarantined"]] == [make_key(1)]
    assert sorted(fake_helper.peers) == sorted([make_key(2), make_key(3)])
    held = rows(db)[make_key(1)]
    assert held.quarantined_at == t0 + STALE + 1 and held.address + "/32" == idle_ip  # address still held
    assert rows(db)[make_key(2)].handshake_at == t0 + STALE
    # Where the sweep's dump saw it is kept too: the peer goes back there if the interface is lost.
    assert rows(db)[make_key(2)].last_endpoint == "198.51.100.2:5000" and rows(db)[make_key(1)].last_endpoint is None
    assert metrics.SWEPT_PEERS.labels("quarantined")._value.get() == quarantined_before + 1

    # A reconcile leaves the quarantined peer off the interface.
    reconcile.reconcile(db, fake_helper)
    assert make_key(1) not in fake_helper.peers

    assert run(db, fake_helper, cfg, t0 + STALE + 1 + QUARANTINE - 1)["freed"] == []
    result = run(db, fake_helper, cfg, t0 + STALE + 1 + QUARANTINE + INTERVAL, audit_log)
    assert [p.public_key for p in result["freed"]] == [make_key(1)]
    assert make_key(1) not in rows(db)
    # Long after: the OrbNET peer is never swept; device 2 went idle too.
    result = run(db, fake_helper, cfg, t0 + 100 * STALE)
    assert [p.public_key for p in result["quarantined"]] == [make_key(2)]
    assert make_key(3) in rows(db) and make_key(3) in fake_helper.peers

    events = [json.loads(line) for line in (tmp_path / "sweep-audit.log").read_text().splitlines()]
    assert [(e["event"], e["peer"]["public_key"], e["actor"]) for e in events] == [
        ("quarantine", make_key(1), {"type": "system"}), ("free", make_key(1), {"type": "system"})]


def test_reconnect_during_quarantine_gets_the_same_address(app, client, auth, fake_helper, cfg, db):
    t0 = time.time()
    ip = connect(client, auth, 1)
    run(db, fake_helper, cfg, t0)
    run(db, fake_helper, cfg, t0 + STALE + 1)
    assert rows(db)[make_key(1)].quarantined_at is not None
    connect(client, auth, 5, user="other")  # a newcomer does not get the held address
    assert rows(db)[make_key(5)].address != ip[:-3]

    released = time.time()
    assert connect(client, auth, 1) == ip
    peer = rows(db)[make_key(1)]
    assert peer.quarantined_at is None and make_key(1) in fake_helper.peers
    assert sweep.idle_since(peer, 0, 0) >= released  # its idle clock starts again from the release


def test_reconnect_with_a_new_key_during_quarantine_keeps_the_address(app, client, auth, fake_helper, cfg, db):
    t0 = time.time()
    ip = connect(client, auth, 1)
    run(db, fake_helper, cfg, t0)
    run(db, fake_helper, cfg, t0 + STALE + 1)
    response = client.post("/wireguard/connect", json={"publicKey": make_key(7)}, headers=auth("u", "d1"))
    assert response.status_code == 200 and response.get_json()["ip"] == ip
    assert fake_helper.calls[-1] == ("apply", [fake_helper.peers[make_key(7)]], [])  # old key was already off
    assert make_key(1) not in rows(db) and rows(db)[make_key(7)].quarantined_at is None


def test_failed_reconnect_leaves_the_peer_quarantined(app, client, auth, fake_helper, cfg, db):
    t0 = time.time()
    connect(client, auth, 1)
    run(db, fake_helper, cfg, t0)
    run(db, fake_helper, cfg, t0 + STALE + 1)
    fake_helper.fail = "unavailable"
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth("u", "d1"))
    assert response.status_code == 503
    assert rows(db)[make_key(1)].quarantined_at == t0 + STALE + 1


def test_disconnect_of_a_quarantined_peer_frees_it_without_the_helper(app, client, auth, fake_helper, cfg, db):
    t0 = time.time()
    connect(client, auth, 1)
    run(db, fake_helper, cfg, t0)
    run(db, fake_helper, cfg, t0 + STALE + 1)
    calls = len(fake_helper.calls)
    response = client.post("/wireguard/disconnect", json={}, headers=auth("u", "d1"))
    assert response.status_code == 200
    assert rows(db) == {} and fake_helper.calls[calls:] == []


def test_one_sweep_per_interval_across_workers(app, client, auth, fake_helper, cfg, db):
    at = time.time()
    assert run(db, fake_helper, cfg, at) is not None
    other = db_connect(app.config["DB_PATH"])  # another worker
    try:
        assert run(other, fake_helper, cfg, at + INTERVAL / 2) is None
        assert run(other, fake_helper, cfg, at + INTERVAL) is not None
    finally:
        other.close()


def test_helper_failure_rolls_the_whole_sweep_back(app, client, auth, fake_helper, cfg, db):
    t0 = time.time()
    connect(client, auth, 1)
    run(db, fake_helper, cfg, t0)
    before = rows(db)

    def failing_apply(add=(), remove=()):
        from app.helper import HelperUnavailable
        raise HelperUnavailable()
    fake_helper.apply = failing_apply
    with pytest.raises(Exception):
        run(db, fake_helper, cfg, t0 + STALE + 1)
    assert rows(db) == before


def test_new_interface_generation_gives_a_grace_period(app, client, auth, fake_helper, cfg, db):
    t0 = time.time()
    connect(client, auth, 1)
    fake_helper.handshakes[make_key(1)] = t0
    run(db, fake_helper, cfg, t0)
    fake_helper.generation = "gen-2"  # helper restarted: handshakes read 0 again
    fake_helper.handshakes.clear()
    assert run(db, fake_helper, cfg, t0 + STALE - 1)["quarantined"] == []
    assert run(db, fake_helper, cfg, t0 + 2 * STALE - 20)["quarantined"] == []  # counted from the new interface
    assert len(run(db, fake_helper, cfg, t0 + 2 * STALE)["quarantined"]) == 1


def test_watcher_sweeps_only_when_enabled(app, client, auth, fake_helper, cfg):
    cfg["STALE_AFTER"] = 0
    assert reconcile.Watcher(cfg, helper=fake_helper).sweep_once() is None
    cfg["STALE_AFTER"] = STALE
    assert reconcile.Watcher(cfg, helper=fake_helper).sweep_once() == {"quarantined": [], "freed": []}


def test_metrics_tell_quarantined_from_live_peers(app, client, auth, internal, fake_helper, cfg, db):
    t0 = time.time()
    connect(client, auth, 1)
    connect(client, auth, 2)
    run(db, fake_helper, cfg, t0)
    fake_helper.handshakes[make_key(2)] = t0 + STALE
    run(db, fake_helper, cfg, t0 + STALE + 1)
    text = client.get("/metrics", headers=internal).get_data(as_text=True)
    assert "orbmesh_quarantined_peers 1.0" in text
    assert 'orbmesh_peers{source="client"} 1.0' in text
    assert 'orbmesh_stale_peers_total{action="quarantined"}' in text


def test_freeing_a_bridged_peer_drops_its_rule(app, fake_helper, cfg, db):
    """Its address may go to a direct client next, whose traffic must not follow the old rule."""
    t0 = time.time()
    allocator = Allocator(app.config["POOL"], app.config["GATEWAY"])
    with write(db):
        peer = store.insert(db, {"public_key": make_key(7), "addr": allocator.allocate(db), "user_id": "u",
                                 "device_id": "d7", "source": "client", "endpoint": None, "keepalive": 0,
                                 "mode": "bridge", "exit_id": "exit-a"})
    fake_helper.peers[make_key(7)] = peer_spec(peer)
    fake_helper.rules[peer.address] = 0
    run(db, fake_helper, cfg, t0)
    assert [p.address for p in run(db, fake_helper, cfg, t0 + STALE + 1)["quarantined"]] == [peer.address]
    assert fake_helper.rules == {peer.address: 0}  # still its own address while quarantined
    assert [p.address for p in run(db, fake_helper, cfg, t0 + STALE + 2 + QUARANTINE)["freed"]] == [peer.address]
    assert fake_helper.rules == {}


def test_a_round_goes_a_slice_at_a_time(app, client, auth, fake_helper, cfg, db, monkeypatch):
    """Each slice is its own transaction and its own `wg set`: a connect never waits for the whole table."""
    monkeypatch.setattr(sweep, "SLICE", 2)
    t0 = time.time()
    for i in range(5):
        connect(client, auth, i)
    run(db, fake_helper, cfg, t0)
    fake_helper.calls.clear()
    result = run(db, fake_helper, cfg, t0 + STALE + 1)
    assert sorted(p.public_key for p in result["quarantined"]) == sorted(make_key(i) for i in range(5))
    assert [len(c[2]) for c in fake_helper.calls if c[0] == "apply"] == [2, 2, 1]
    assert fake_helper.peers == {}


def test_a_helper_failure_rolls_back_its_slice_and_ends_the_round(app, client, auth, fake_helper, cfg, db,
                                                                  monkeypatch):
    monkeypatch.setattr(sweep, "SLICE", 1)
    t0 = time.time()
    for i in range(3):
        connect(client, auth, i)
    run(db, fake_helper, cfg, t0)
    real_apply, applied = fake_helper.apply, []

    def second_fails(add=(), remove=()):
        from app.helper import HelperUnavailable
        if applied:
            raise HelperUnavailable()
        applied.append(remove)
        return real_apply(add, remove)
    fake_helper.apply = second_fails
    with pytest.raises(Exception):
        run(db, fake_helper, cfg, t0 + STALE + 1)
    quarantined = {k for k, p in rows(db).items() if p.quarantined_at}
    assert quarantined == {make_key(0)} and sorted(fake_helper.peers) == [make_key(1), make_key(2)]
