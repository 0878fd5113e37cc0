"""Usage accounting, limits and the quota (app/peers/usage.py), with the fake helper."""
import json
import sqlite3
import time

import pytest

from app.helper import HelperFailed
from app.ops import metrics
from app.peers import reconcile, store, usage
from app.peers.audit import AuditLog
from app.peers.db import connect as db_connect
from app.peers.db import get_meta, write
from tests.app.scrape import delta, scrape, value
from tests.conftest import FAKE_BOOT, make_key


@pytest.fixture
def cfg(app):
    app.config.update(USAGE_INTERVAL=1.0)
    return app.config


@pytest.fixture
def db(app):
    conn = db_connect(app.config["DB_PATH"])
    yield conn
    conn.close()


def connect(client, auth, i, user="u", plan=None, token=None, status=200):
    headers = auth(user, "d%d" % i) if token is None else {"Authorization": "Bearer " + token(user, "d%d" % i,
                                                                                                   plan=plan)}
    response = client.post("/wireguard/connect", json={"publicKey": make_key(i)}, headers=headers)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def count(db, helper, cfg, **kw):
    return usage.collect(db, helper, cfg, force=True, **kw)


def totals(db, user="u"):
    return usage.user_usage(db, user)["total"]


def limits(client, internal, status=200, **body):
    response = client.post("/wireguard/limits", headers=internal, json=dict({"userUuid": "u"}, **body))
    assert response.status_code == status, response.get_json()
    return response.get_json()


# --- counting -------------------------------------------------------------------------------------

def test_deltas_add_up_and_a_counter_that_went_down_counts_from_zero(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    key = make_key(1)
    fake_helper.counters[key] = (1000, 5000)
    assert count(db, fake_helper, cfg) == {"u"}
    fake_helper.counters[key] = (1500, 9000)
    count(db, fake_helper, cfg)
    assert totals(db) == {"bytesUp": 1500, "bytesDown": 9000, "bytes": 10500}
    fake_helper.counters[key] = (100, 200)  # the peer left the interface and came back: counts from zero
    count(db, fake_helper, cfg)
    assert totals(db) == {"bytesUp": 1600, "bytesDown": 9200, "bytes": 10800}
    fake_helper.epoch = "8"  # the link was made again; its counters may well be above the old ones
    fake_helper.counters[key] = (5000, 5000)
    count(db, fake_helper, cfg)
    assert totals(db) == {"bytesUp": 6600, "bytesDown": 14200, "bytes": 20800}


def test_a_sample_is_counted_once_whichever_worker_counts_it(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (1000, 1000)
    sample = fake_helper.usage()
    other = db_connect(app.config["DB_PATH"])

    class Replay:  # two workers that got the same sample, and one that got an older one
        def __init__(self, answer):
            self.answer = answer

        def usage(self, since=None, fresh=False):
            return self.answer

    try:
        assert usage.collect(db, Replay(sample), cfg, force=True) == {"u"}
        assert usage.collect(other, Replay(sample), cfg, force=True) is None
        older = dict(sample, taken_at=sample["taken_at"] - 5, peers=[[make_key(1), 900, 900, 0, None]])
        assert usage.collect(other, Replay(older), cfg, force=True) is None
    finally:
        other.close()
    assert totals(db)["bytes"] == 2000
    assert json.loads(get_meta(db, "usage_sample")) == {"boot": FAKE_BOOT, "taken_at": sample["taken_at"]}


def test_one_worker_counts_per_interval(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    usage.collect(db, fake_helper, cfg)  # the first round is due
    calls = len([c for c in fake_helper.calls if c[0] == "usage"])
    assert calls == 1
    assert usage.collect(db, fake_helper, cfg) is None  # not due yet: no helper call
    assert len([c for c in fake_helper.calls if c[0] == "usage"]) == calls


@pytest.mark.parametrize("dump, blocks, gap", [
    (0.001, True, 2.0),     # USAGE_INTERVAL: a small node counts as configured
    (1.0, False, 100.0),    # a kernel dump of 60,000 peers: COST_SHARE of a core (its wall time, ~1 s)
    (1.0, True, 400.0),     # wireguard-go's: every change waits for it, so STALL_SHARE of the time
    (0.04, True, 4.0),      # shorter than STALL_FREE: as long as a `wg set`, not spaced for the stall
])
def test_the_next_count_is_spaced_by_what_the_dump_cost_and_held(app, client, auth, fake_helper, cfg, db, dump,
                                                                   blocks, gap):
    cfg["USAGE_INTERVAL"] = 2.0
    connect(client, auth, 1)
    fake_helper.dump_seconds, fake_helper.dump_blocks = dump, blocks
    before = time.time()
    count(db, fake_helper, cfg)
    assert float(get_meta(db, "usage_next_at")) - before == pytest.approx(gap, rel=0.05, abs=0.5)


def test_a_user_near_the_quota_is_counted_sooner_but_not_past_the_stall_share(app, client, auth, internal,
                                                                             fake_helper, cfg, db):
    cfg["USAGE_INTERVAL"] = 30.0
    limits(client, internal, quotaBytes=10 ** 6)
    connect(client, auth, 1)
    count(db, fake_helper, cfg)
    fake_helper.taken_at += 9  # 10 s after the last sample, 400,000 bytes: the quota is 15 s away at this pace
    fake_helper.counters[make_key(1)] = (200000, 200000)
    before = time.time()
    count(db, fake_helper, cfg)
    assert float(get_meta(db, "usage_next_at")) - before == pytest.approx(7.5, abs=0.5)  # half of it
    fake_helper.dump_seconds = 1.0  # wireguard-go at 60,000 peers: the quota object stops the user meanwhile
    fake_helper.taken_at += 9
    fake_helper.counters[make_key(1)] = (400000, 400000)
    before = time.time()
    count(db, fake_helper, cfg)
    assert float(get_meta(db, "usage_next_at")) - before == pytest.approx(400, rel=0.05)


def test_the_next_count_asks_only_for_what_moved_since(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    count(db, fake_helper, cfg)
    count(db, fake_helper, cfg)
    since = [c[1] for c in fake_helper.calls if c[0] == "usage"]
    assert since[0] is None and since[1] == {"boot": FAKE_BOOT, "taken_at": fake_helper.taken_at - 1}


def test_reconcile_prunes_the_baselines_of_keys_without_a_row(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    connect(client, auth, 2)
    fake_helper.counters.update({make_key(1): (5, 5), make_key(2): (5, 5)})
    count(db, fake_helper, cfg)
    with write(db):
        store.delete(db, store.by_key(db, make_key(1)))  # say, freed by the sweep
    reconcile.reconcile(db, fake_helper)
    assert [r[0] for r in db.execute("SELECT public_key FROM usage_seen")] == [make_key(2)]


def test_a_removed_peer_is_still_counted_for_its_device(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (10, 20)
    count(db, fake_helper, cfg)
    with write(db):
        store.delete(db, store.by_key(db, make_key(1)))  # its row goes first (disconnect), the peer is still there
    fake_helper.counters[make_key(1)] = (15, 30)
    count(db, fake_helper, cfg)
    assert totals(db) == {"bytesUp": 15, "bytesDown": 30, "bytes": 45}
    assert usage.user_usage(db, "u")["devices"][0]["state"] == "disconnected"


def test_disconnect_of_a_busy_peer_counts_a_fresh_sample_first(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (10 ** 6, 10 ** 6)
    count(db, fake_helper, cfg)  # it moved 2 MB: busy
    fake_helper.counters[make_key(1)] = (3 * 10 ** 6, 10 ** 6)
    assert client.post("/wireguard/disconnect", headers=auth("u", "d1")).status_code == 200
    assert ("usage", {"boot": FAKE_BOOT, "taken_at": fake_helper.taken_at - 1}, True) in fake_helper.calls
    assert totals(db)["bytes"] == 4 * 10 ** 6
    assert db.execute("SELECT count(*) FROM usage_seen").fetchone()[0] == 0  # it starts from zero if it returns


def test_an_idle_peer_leaves_without_a_dump(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    count(db, fake_helper, cfg)
    client.post("/wireguard/disconnect", headers=auth("u", "d1"))
    assert not [c for c in fake_helper.calls if c[0] == "usage" and c[2]]


def test_transport_handshake_and_bytes_by_transport(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    connect(client, auth, 2)
    before = scrape(client)
    fake_helper.counters.update({make_key(1): (100, 200), make_key(2): (300, 400)})
    fake_helper.endpoints.update({make_key(1): "192.0.2.7:40000", make_key(2): "127.0.0.1:50123"})
    fake_helper.handshakes[make_key(1)] = 1_800_000_000
    usage.note_tunnel(db, "u", "d2", "http")
    count(db, fake_helper, cfg)
    devices = {d["deviceId"]: d for d in usage.user_usage(db, "u")["devices"]}
    assert (devices["d1"]["transport"], devices["d2"]["transport"]) == ("udp", "http")
    assert devices["d1"]["lastHandshake"] == "2027-01-15T08:00:00Z" and devices["d2"]["lastHandshake"] is None
    after = scrape(client)
    assert delta(before, after, "orbmesh_usage_bytes_total", transport="udp", direction="up") == 100
    assert delta(before, after, "orbmesh_usage_bytes_total", transport="http", direction="down") == 400
    assert store.by_key(db, make_key(1)).last_endpoint == "192.0.2.7:40000"


# --- limits and the token's plan ----------------------------------------------------------------------

def test_a_tiered_users_address_reaches_the_helper_with_its_peer(app, client, auth, internal, fake_helper, db):
    limits(client, internal, rateMbps=20)
    fake_helper.calls.clear()
    body = connect(client, auth, 1)
    assert sorted(c[0] for c in fake_helper.calls if c[0] in ("limits", "apply")) == ["apply", "limits"]
    assert fake_helper.limited["u"] == {"user": "u", "addresses": ["10.8.0.2", body["ip6"].split("/")[0]],
                                        "rate_mbps": 20}
    client.post("/wireguard/disconnect", headers=auth("u", "d1"))
    assert "u" not in fake_helper.limited  # no address left
    # An untiered user's connect and disconnect cost no limits call at all.
    fake_helper.calls.clear()
    client.post("/wireguard/connect", json={"publicKey": make_key(5)}, headers=auth("v", "d5"))
    client.post("/wireguard/disconnect", headers=auth("v", "d5"))
    assert not [c for c in fake_helper.calls if c[0] == "limits"]


def test_a_failed_limits_push_leaves_the_connect_and_schedules_a_reconcile(app, client, auth, internal, fake_helper,
                                                                            db):
    """The peer is on the interface first; its limits follow (usage.later), and a failure there is put
    right by the next reconcile, which writes every limit again."""
    limits(client, internal, rateMbps=20)

    def failing(users, replace=False):
        raise HelperFailed({"code": "COMMAND_FAILED", "message": "nft exited 1"})

    fake_helper.limits = failing
    with write(db):
        db.execute("INSERT INTO meta (key, value) VALUES ('reconciled_generation', 'gen-1') "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    connect(client, auth, 1)
    assert make_key(1) in fake_helper.peers
    assert get_meta(db, "reconciled_generation") == ""  # the next watcher round syncs in full


def test_the_token_plan_applies_until_the_api_sets_one(app, client, token, internal, fake_helper, db):
    connect(client, None, 1, token=token, plan={"rate_mbps": 10, "quota_bytes": 5000})
    plan = usage.plan_of(db, "u")
    assert (plan.rate_mbps, plan.rate_from, plan.quota_bytes, plan.quota_from) == (10, "token", 5000, "token")
    limits(client, internal, rateMbps=None)  # the API clears the tier: it wins over the token
    connect(client, None, 2, token=token, plan={"rate_mbps": 10, "quota_bytes": 6000})
    plan = usage.plan_of(db, "u")
    assert (plan.rate_mbps, plan.rate_from, plan.quota_bytes, plan.quota_from) == (None, "api", 6000, "token")


@pytest.mark.parametrize("plan, field", [({"rate_mbps": 0}, "token.rate_mbps"), ({"rate_mbps": "20"}, "token.rate_mbps"),
                                         ({"quota_bytes": -1}, "token.quota_bytes"),
                                         ({"quota_bytes": True}, "token.quota_bytes")])
def test_a_token_with_a_bad_plan_is_refused_and_changes_nothing(app, client, token, fake_helper, snapshot, plan,
                                                               field):
    before = snapshot()
    body = connect(client, None, 1, token=token, plan=plan, status=400)
    assert body["error"]["code"] == "VALIDATION_ERROR" and field in body["error"]["details"]["fields"]
    assert snapshot()[0] == before[0] and fake_helper.peers == {}


def test_reconcile_sends_every_limit_and_skips_a_node_without_any(app, client, auth, internal, fake_helper, db):
    connect(client, auth, 1)
    reconcile.reconcile(db, fake_helper)
    assert not [c for c in fake_helper.calls if c[0] == "limits"]  # never had a limit: no call
    limits(client, internal, rateMbps=5)
    fake_helper.limited = {}  # a new helper knows nothing
    reconcile.reconcile(db, fake_helper)
    assert fake_helper.calls[-1][0] == "limits" and fake_helper.calls[-1][2] is True
    assert fake_helper.limited["u"]["addresses"][0] == "10.8.0.2"


# --- the quota ---------------------------------------------------------------------------------------

def test_quota_cut_and_new_period(app, client, auth, internal, fake_helper, cfg, db, tmp_path):
    audit_log = AuditLog(str(tmp_path / "quota-audit.log"), 1 << 20, 2)
    limits(client, internal, quotaBytes=1000)
    connect(client, auth, 1)
    connect(client, auth, 2)
    fake_helper.endpoints[make_key(1)] = "198.51.100.7:5555"
    fake_helper.counters[make_key(1)] = (400, 599)
    count(db, fake_helper, cfg, audit_log=audit_log)
    assert len(fake_helper.peers) == 2  # 999 < 1000
    cuts = metrics.QUOTA_CUTS._value.get()
    fake_helper.counters[make_key(1)] = (400, 600)
    count(db, fake_helper, cfg, audit_log=audit_log)
    assert fake_helper.peers == {} and len(store.all_peers(db)) == 2  # off the interface, rows kept
    assert store.live_peers(db) == [] and metrics.QUOTA_CUTS._value.get() == cuts + 1
    lines = [json.loads(line) for line in open(tmp_path / "quota-audit.log")]
    assert [(e["event"], e["user"], e["usage_bytes"], e["quota_bytes"], e["peers"]) for e in lines] == [
        ("quota", "u", 1000, 1000, 2)]
    body = connect(client, auth, 1, status=403)
    assert body["error"] == {"code": "QUOTA_EXCEEDED", "message": "This user's data quota on this server is used up",
                             "details": {"usageBytes": 1000, "quotaBytes": 1000}}
    assert connect(client, auth, 9, status=403)["error"]["code"] == "QUOTA_EXCEEDED"  # a new device too
    reconcile.reconcile(db, fake_helper)
    assert fake_helper.peers == {}  # reconcile keeps them off
    usage_now = limits(client, internal, resetUsage=True)
    assert usage_now["state"] == "active" and usage_now["total"]["bytes"] == 0 and usage_now["period"] == 1
    back = fake_helper.peers[make_key(1)]
    assert back["endpoint"] == "198.51.100.7:5555" and back["keepalive"] == 25  # the server handshakes at once
    assert set(fake_helper.peers) == {make_key(1), make_key(2)}
    assert len([json.loads(line) for line in open(tmp_path / "quota-audit.log")]) == 1


def test_a_higher_quota_lets_them_back_and_a_lower_one_cuts_at_once(app, client, auth, internal, fake_helper, cfg,
                                                                    db):
    limits(client, internal, quotaBytes=100)
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (100, 100)
    count(db, fake_helper, cfg)
    assert fake_helper.peers == {}
    assert limits(client, internal, quotaBytes=150)["state"] == "quota_exceeded"  # still over: stays cut
    assert limits(client, internal, quotaBytes=1000)["state"] == "active"
    assert list(fake_helper.peers) == [make_key(1)]
    assert limits(client, internal, quotaBytes=10)["state"] == "quota_exceeded"
    assert fake_helper.peers == {}
    assert limits(client, internal, quotaBytes=None)["state"] == "active"
    assert list(fake_helper.peers) == [make_key(1)]


def test_a_count_aims_the_quota_objects_of_users_past_half_their_quota(app, client, auth, internal, fake_helper,
                                                                        cfg, db):
    limits(client, internal, quotaBytes=1000)
    limits(client, internal, userUuid="t", rateMbps=5)  # a tier alone: no object to aim
    connect(client, auth, 1)
    connect(client, auth, 2, user="t")
    aimed = lambda: [[(e["user"], e.get("used")) for e in call[1]] for call in fake_helper.calls  # noqa: E731
                     if call[0] == "limits"]
    fake_helper.calls.clear()
    fake_helper.counters.update({make_key(1): (200, 299), make_key(2): (10 ** 6, 0)})
    count(db, fake_helper, cfg)
    assert aimed() == []  # 499 of 1,000: the object as it was made still cuts within 0.85% of the quota
    fake_helper.counters[make_key(1)] = (200, 300)
    count(db, fake_helper, cfg)
    assert aimed() == [[("u", 500)]]
    peer = fake_helper.peers[make_key(1)]
    assert fake_helper.limited["u"]["addresses"] == [a.split("/")[0] for a in peer["allowed_ips"]]
    fake_helper.calls.clear()
    count(db, fake_helper, cfg)
    assert aimed() == []  # nothing moved: nothing to aim
    fake_helper.counters[make_key(1)] = (200, 700)
    fake_helper.fail = "failed"
    with pytest.raises(HelperFailed):
        count(db, fake_helper, cfg)  # the sample itself fails: nothing counted
    fake_helper.fail = None
    count(db, fake_helper, cfg)
    assert aimed() == [[("u", 900)]]


def test_a_user_whose_kernel_quota_is_used_up_is_cut_a_little_short(app, client, auth, internal, fake_helper, cfg,
                                                                      db, tmp_path):
    """The helper's quota object counts IP packets; when it is used up the usage may be just short of it."""
    audit_log = AuditLog(str(tmp_path / "quota-audit.log"), 1 << 20, 2)
    limits(client, internal, quotaBytes=1000)
    limits(client, internal, userUuid="v")  # no quota: a name the helper sends is not enough
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (600, 390)
    fake_helper.over_quota = ["u", "v"]
    count(db, fake_helper, cfg, audit_log=audit_log)
    assert usage.plan_of(db, "u").cut_at is not None and fake_helper.peers == {}
    assert usage.plan_of(db, "v").cut_at is None
    line = json.loads(open(tmp_path / "quota-audit.log").read())
    assert (line["usage_bytes"], line["quota_bytes"]) == (990, 1000)


def test_a_cut_that_fails_is_counted_and_retried(app, client, auth, internal, fake_helper, cfg, db):
    limits(client, internal, quotaBytes=100)
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (100, 100)
    failures = metrics.QUOTA_FAILURES._value.get()
    original = fake_helper.apply

    def failing(add=(), remove=()):
        fake_helper.fail = "unavailable"
        try:
            return original(add, remove)
        finally:
            fake_helper.fail = None

    fake_helper.apply = failing
    count(db, fake_helper, cfg)
    assert metrics.QUOTA_FAILURES._value.get() == failures + 1
    assert usage.plan_of(db, "u").cut_at is None and store.live_peers(db)  # nothing half done
    fake_helper.apply = original
    fake_helper.counters[make_key(1)] = (101, 100)
    count(db, fake_helper, cfg)
    assert usage.plan_of(db, "u").cut_at is not None and fake_helper.peers == {}


def test_the_tunnels_refuse_a_cut_user(app, client, auth, internal, fake_helper, cfg, db):
    limits(client, internal, quotaBytes=10)
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (10, 0)
    count(db, fake_helper, cfg)
    app.extensions["orbmesh_cut_users"].TTL = 0
    response = client.post("/wireguard/tunnel", data=b"\x01" + b"\x00" * 31, headers=dict(
        auth("u", "d1"), **{"Content-Type": "application/octet-stream"}))
    assert response.status_code == 403 and response.get_json()["error"]["details"] == {"usageBytes": 10,
                                                                                       "quotaBytes": 10}
    response = client.get("/wireguard/ws", headers=dict(auth("u", "d1"), Upgrade="websocket", Connection="Upgrade",
                                                        **{"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                           "Sec-WebSocket-Version": "13"}))
    assert response.status_code == 403 and response.get_json()["error"]["code"] == "QUOTA_EXCEEDED"
    # Another user's tunnel is not touched (the control).
    other = client.post("/wireguard/tunnel", data=b"", headers=dict(
        auth("v", "d1"), **{"Content-Type": "application/octet-stream", "X-Tunnel-Wait": "0"}))
    assert other.status_code == 204


def test_gauges_of_users_at_quota_and_tiers(app, client, auth, internal, fake_helper, cfg, db):
    limits(client, internal, quotaBytes=10, rateMbps=5)
    limits(client, internal, userUuid="v", rateMbps=7)
    connect(client, auth, 1)
    fake_helper.counters[make_key(1)] = (10, 0)
    count(db, fake_helper, cfg)
    samples = scrape(client)
    assert value(samples, "orbmesh_users_at_quota") == 1 and value(samples, "orbmesh_users_with_tier") == 2
    assert value(samples, "orbmesh_users_with_quota") == 1
    assert value(samples, "orbmesh_helper_up") == 1 and value(samples, "orbmesh_interface_up") == 1
    fake_helper.fail = "unavailable"
    assert value(scrape(client), "orbmesh_helper_up") == 0


def test_peers_without_a_handshake_are_counted_after_the_grace(app, client, auth, fake_helper, cfg, db):
    connect(client, auth, 1)
    connect(client, auth, 2)
    with write(db):
        db.execute("UPDATE peers SET updated_at = updated_at - 600")
    fake_helper.handshakes[make_key(2)] = 4_000_000_000
    count(db, fake_helper, cfg)
    assert value(scrape(client), "orbmesh_peers_without_handshake") == 1


def test_schema_upgrade_of_an_older_database(tmp_path):
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    old.commit()
    old.close()
    from app.peers.db import init_schema
    init_schema(path)
    conn = sqlite3.connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    assert {"usage_users", "usage_devices", "usage_seen", "peers"} <= tables
