"""Bridge mode in the app: connect and disconnect through an exit, SmartConnect's pick and its
fallback, reconcile and idle teardown, against a real database, a fake helper and a fake exit API."""
import json
import sqlite3

import pytest

from app.errors import ApiError
from app.reconcile import reconcile
from tests.conftest import BRIDGE_KEY, make_key

EXIT_KEY = make_key(77)
API_KEY = "exit-api-key-0123456789-secret"
EXIT = {"id": "exit-1", "endpoint": "198.51.100.1:51820", "publicKey": EXIT_KEY,
        "apiUrl": "http://198.51.100.1:8080/", "apiKey": API_KEY, "bridgeAddress": "10.9.255.1"}
KEY_A, KEY_B = make_key(1), make_key(2)


class FakeExitClient:
    def __init__(self):
        self.calls = []
        self.down = False
        self.health = True

    def register(self, exit, user, public_key):
        self.calls.append(("register", exit["id"], user, public_key))
        if self.down:
            raise ApiError("BRIDGE_UNAVAILABLE", "Exit server %s cannot be reached" % exit["id"])

    def unregister(self, exit, user):
        self.calls.append(("unregister", exit["id"], user))

    def healthy(self, exit):
        return self.health


@pytest.fixture
def settings(settings, tmp_path):
    (tmp_path / "exits.json").write_text(json.dumps({"exits": [EXIT]}))
    (tmp_path / "policy.json").write_text(json.dumps({"rules": [
        {"networks": ["203.0.113.0/24"], "exits": ["gone", "exit-1"]},
        {"networks": ["0.0.0.0/0"], "exits": []}]}))
    return dict(settings, EXIT_REGISTRY_FILE=str(tmp_path / "exits.json"),
                SMARTCONNECT_POLICY=str(tmp_path / "policy.json"), BRIDGE_IDLE_GRACE=60)


@pytest.fixture
def exit_api(app):
    fake = FakeExitClient()
    app.extensions["orbmesh_bridges"].client = fake
    return fake


def connect(client, headers, key, real_ip=None, **extra):
    if real_ip:
        headers = dict(headers, **{"X-Real-IP": real_ip})
    return client.post("/wireguard/connect", json={"publicKey": key, **extra}, headers=headers)


def bridge_rows(app):
    db = sqlite3.connect(app.config["DB_PATH"])
    try:
        return db.execute("SELECT exit_id, slot, idle_since FROM bridges").fetchall()
    finally:
        db.close()


def names(calls):
    return [c[0] for c in calls]


# --- connect and disconnect ------------------------------------------------------

def test_bridge_connect_registers_opens_routes_then_adds_peer(client, auth, fake_helper, exit_api):
    response = connect(client, auth(), KEY_A, exitServerId="exit-1")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["mode"], body["exitServerId"], body["ip"]) == ("bridge", "exit-1", "10.8.0.2/32")
    # A bridged session has no IPv6: its peer holds no /128, so its IPv6 ends at this entry.
    assert (body["ip6"], body["gateway6"], body["dns"]) == (None, None, ["10.8.0.1", "1.1.1.1"])
    assert fake_helper.peers[KEY_A]["allowed_ips"] == ["10.8.0.2/32"]
    assert exit_api.calls == [("register", "exit-1", "orbmesh-bridge@198.51.100.1", BRIDGE_KEY)]
    assert fake_helper.bridges == {0: (EXIT_KEY, "198.51.100.1:51820", "10.9.255.1", 25)}
    # The rule exists before the peer can send a packet.
    assert names(fake_helper.calls)[-3:] == ["bridge_up", "bridge_rules", "apply"]
    assert fake_helper.rules == {"10.8.0.2": 0}


def test_unknown_exit_and_unreachable_exit_leave_nothing(client, auth, fake_helper, exit_api, snapshot, app):
    before = snapshot()
    response = connect(client, auth(), KEY_A, exitServerId="nope")
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "EXIT_NOT_FOUND"
    exit_api.down = True
    response = connect(client, auth(), KEY_A, exitServerId="exit-1")
    assert response.status_code == 502 and response.get_json()["error"]["code"] == "BRIDGE_UNAVAILABLE"
    rows, _, peers = snapshot()
    assert (rows, peers) == (before[0], before[2]) and fake_helper.rules == {}
    assert "apply" not in names(fake_helper.calls)
    # The slot taken for the attempt is idle at once, for the watcher to release.
    assert [(r[0], r[2]) for r in bridge_rows(app)] == [("exit-1", 0)]


def test_helper_failure_after_open_is_undone(client, auth, fake_helper, exit_api, snapshot):
    before = snapshot()
    original = fake_helper.apply

    def failing_apply(*a, **k):
        fake_helper.fail = "failed"
        try:
            return original(*a, **k)
        finally:
            fake_helper.fail = None
    fake_helper.apply = failing_apply
    assert connect(client, auth(), KEY_A, exitServerId="exit-1").status_code == 502
    assert snapshot()[0] == before[0] and fake_helper.rules == {}


def test_disconnect_removes_rule_and_idle_tunnel_closes_after_grace(client, auth, fake_helper, exit_api, app):
    connect(client, auth("u", "d1"), KEY_A, exitServerId="exit-1")
    connect(client, auth("u", "d2"), KEY_B, exitServerId="exit-1")
    assert client.post("/wireguard/disconnect", headers=auth("u", "d1")).status_code == 200
    assert fake_helper.rules == {"10.8.0.3": 0} and bridge_rows(app)[0][2] is None
    client.post("/wireguard/disconnect", headers=auth("u", "d2"))
    assert fake_helper.rules == {}
    ((_, slot, idle),) = bridge_rows(app)
    bridges = app.extensions["orbmesh_bridges"]
    db = sqlite3.connect(app.config["DB_PATH"], isolation_level=None)
    try:
        bridges.tick(db, fake_helper)  # within the grace period: stays
        assert fake_helper.bridges and bridge_rows(app)
        db.execute("UPDATE bridges SET idle_since = ?", (idle - 61,))
        bridges.tick(db, fake_helper)
    finally:
        db.close()
    assert fake_helper.bridges == {} and bridge_rows(app) == []
    assert exit_api.calls[-1] == ("unregister", "exit-1", "orbmesh-bridge@198.51.100.1")


def test_switching_a_device_between_direct_and_bridge(client, auth, fake_helper, exit_api):
    assert connect(client, auth(), KEY_A, force_direct=True).get_json()["ip6"] == "fd00:8::2/128"
    assert connect(client, auth(), KEY_A, exitServerId="exit-1").get_json()["ip"] == "10.8.0.2/32"
    assert fake_helper.rules == {"10.8.0.2": 0}
    assert fake_helper.peers[KEY_A]["allowed_ips"] == ["10.8.0.2/32"]  # the /128 is taken off
    assert connect(client, auth(), KEY_A, force_direct=True).get_json()["mode"] == "direct"
    assert fake_helper.rules == {}
    assert list(fake_helper.peers) == [KEY_A]
    assert fake_helper.peers[KEY_A]["allowed_ips"] == ["10.8.0.2/32", "fd00:8::2/128"]  # and back


# --- SmartConnect ----------------------------------------------------------------

def test_smartconnect_policy_force_direct_and_fallback(client, auth, fake_helper, exit_api):
    # 127.0.0.1 is a trusted proxy by default, so X-Real-IP is the client address.
    body = connect(client, auth("u", "a"), KEY_A, real_ip="203.0.113.9").get_json()
    assert (body["mode"], body["exitServerId"]) == ("bridge", "exit-1")
    assert connect(client, auth("u", "b"), KEY_B, real_ip="203.0.113.9", force_direct=True).get_json()["mode"] \
        == "direct"
    assert connect(client, auth("u", "c"), make_key(3), real_ip="192.0.2.9").get_json()["mode"] == "direct"
    exit_api.health = False
    assert connect(client, auth("u", "d"), make_key(4), real_ip="203.0.113.9").get_json()["mode"] == "direct"
    exit_api.health, exit_api.down = True, True
    body = connect(client, auth("u", "e"), make_key(5), real_ip="203.0.113.9").get_json()
    assert (body["success"], body["mode"]) == (True, "direct")  # recommended exit failed: direct, not an error


# --- reconcile -------------------------------------------------------------------

def test_reconcile_restores_tunnels_and_exactly_the_rules(client, auth, fake_helper, exit_api, app):
    connect(client, auth("u", "d1"), KEY_A, exitServerId="exit-1")
    connect(client, auth("u", "d2"), KEY_B, force_direct=True)
    fake_helper.bridges, fake_helper.rules = {}, {"10.8.0.77": 3}  # a restarted helper, a stale rule
    db = sqlite3.connect(app.config["DB_PATH"], isolation_level=None)
    try:
        reconcile(db, fake_helper, "gen-2", bridges=app.extensions["orbmesh_bridges"])
    finally:
        db.close()
    assert fake_helper.bridges == {0: (EXIT_KEY, "198.51.100.1:51820", "10.9.255.1", 25)}
    assert fake_helper.rules == {"10.8.0.2": 0}
    assert fake_helper.calls[-1] == ("bridge_rules", [{"address": "10.8.0.2", "slot": 0}], [], True)
