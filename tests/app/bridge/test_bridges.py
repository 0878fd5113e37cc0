"""Bridge mode in the app: connect and disconnect through an exit, SmartConnect's pick and its
fallback, reconcile and idle teardown, against a real database, a fake helper and a fake exit API."""
import json
import sqlite3
import threading
import time

import pytest

from app.bridge.bridges import bridge_user
from app.failures import BridgeUnavailable
from app.peers import db as database
from app.peers.reconcile import reconcile
from tests.app.bridge.exitstub import SlowExit
from tests.conftest import BRIDGE_KEY, make_key

EXIT_KEY = make_key(77)
API_KEY = "exit-api-key-0123456789-secret"
EXIT = {"id": "exit-1", "endpoint": "198.51.100.1:51820", "publicKey": EXIT_KEY,
        "apiUrl": "https://198.51.100.1:8443/", "apiKey": API_KEY, "bridgeAddress": "10.9.255.1"}
KEY_A, KEY_B = make_key(1), make_key(2)
USER = bridge_user(BRIDGE_KEY)


class FakeExitClient:
    def __init__(self):
        self.calls = []
        self.down = False
        self.health = True

    def register(self, exit, user, public_key):
        self.calls.append(("register", exit["id"], user, public_key))
        if self.down:
            raise BridgeUnavailable("Exit server %s cannot be reached" % exit["id"])

    def unregister(self, exit, user, public_key):
        self.calls.append(("unregister", exit["id"], user, public_key))

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
    assert exit_api.calls == [("register", "exit-1", USER, BRIDGE_KEY)]
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
    assert exit_api.calls[-1] == ("unregister", "exit-1", USER, BRIDGE_KEY)  # only our own peer


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


def test_the_bridge_user_is_derived_from_the_bridge_key(client, auth, app, exit_api):
    """Two entries with the same ORBMESH_PUBLIC_HOST (127.0.0.1 unless set) must not share a user on an exit."""
    assert USER == "orbmesh-bridge-" + "42" * 32 and bridge_user(make_key(5)) != USER
    assert connect(client, auth(), KEY_A, exitServerId="exit-1").status_code == 200
    helper = app.extensions["orbmesh_helper"]
    helper.learn(dict(helper.hello(), bridge_public_key=make_key(5)))  # another server: another bridge key
    assert connect(client, auth("u", "d2"), KEY_B, exitServerId="exit-1").status_code == 200
    users = [call[2] for call in exit_api.calls if call[0] == "register"]
    assert users == [USER, bridge_user(make_key(5))]


# --- a slow exit -------------------------------------------------------------------

def test_a_slow_exit_does_not_hold_a_direct_connect_while_its_tunnel_closes(app, client, auth, fake_helper,
                                                                             tmp_path):
    """Tearing an idle tunnel down calls the exit's remove-peer; that call holds no database lock.

    The stub exit answers one byte every 0.5 s.  The deadline is set far
    beyond the test, so only the lock (not the deadline) decides whether the
    direct connect has to wait for it: it must finish while the teardown is
    still waiting for the exit.
    """
    slow = SlowExit(interval=0.5)
    (tmp_path / "exits.json").write_text(json.dumps({"exits": [dict(EXIT, apiUrl=slow.url)]}))
    bridges = app.extensions["orbmesh_bridges"]
    bridges.registry.allow_http = True
    bridges.client.timeout = 600
    bridges.registry.refresh()
    fake_helper.bridges[0] = (EXIT_KEY, EXIT["endpoint"], EXIT["bridgeAddress"], 25)
    watcher_db = database.connect(app.config["DB_PATH"])
    with database.write(watcher_db):
        watcher_db.execute("INSERT INTO bridges (exit_id, slot, idle_since) VALUES ('exit-1', 0, ?)",
                           (time.time() - 3600,))
    teardown = threading.Thread(target=bridges.tick, args=(watcher_db, fake_helper), daemon=True)
    teardown.start()
    try:
        assert slow.received.wait(30), "the teardown never called the exit"
        response = connect(client, auth("u", "direct"), KEY_A, force_direct=True)
        assert response.status_code == 200 and response.get_json()["mode"] == "direct"
        assert teardown.is_alive() and not slow.finished.is_set()  # the exit was still answering
        method, path, headers, body = slow.requests[0]
        assert (method, path, body) == ("POST", "/wireguard/remove-peer", {"userUuid": USER, "publicKey": BRIDGE_KEY})
        assert headers["x-api-key"] == API_KEY
    finally:
        slow.stop()
        teardown.join(30)
        watcher_db.close()
    assert not teardown.is_alive() and fake_helper.bridges == {} and bridge_rows(app) == []


# --- how many exits one device or user may open ------------------------------------

def many_exits(tmp_path, count):
    exits = [dict(EXIT, id="exit-%d" % n, bridgeAddress="10.9.255.%d" % n, publicKey=make_key(100 + n))
             for n in range(1, count + 1)]
    (tmp_path / "exits.json").write_text(json.dumps({"exits": exits}))


def test_one_device_hopping_exits_cannot_hold_every_bridge_slot(client, auth, app, exit_api, tmp_path):
    """Each new exit holds a slot for ORBMESH_BRIDGE_IDLE_GRACE after its client left; the default caps a device."""
    many_exits(tmp_path, 12)
    limit = app.config["BRIDGE_EXITS_PER_DEVICE"]
    answers = [connect(client, auth("hopper", "d1"), KEY_A, exitServerId="exit-%d" % n) for n in range(1, 13)]
    assert [a.status_code for a in answers] == [200] * limit + [429] * (12 - limit)
    assert {a.get_json()["error"]["code"] for a in answers[limit:]} == {"BRIDGE_LIMIT"}
    assert len(bridge_rows(app)) == limit
    assert connect(client, auth("someone", "d1"), KEY_B, exitServerId="exit-12").status_code == 200  # others still can


def test_exit_limits_per_device_and_per_user(settings, tmp_path, monkeypatch, exit_api_for):
    application = exit_api_for(dict(settings, BRIDGE_EXITS_PER_DEVICE=2, BRIDGE_EXITS_PER_USER=3))
    client, exit_api, fake_helper = application.test_client(), application.exit_api, application.fake_helper
    many_exits(tmp_path, 6)

    def auth(user, device):
        from app.api.auth import mint_device_token
        return {"Authorization": "Bearer " + mint_device_token(application.config, user, device)}

    def go(user, device, key, exit_id):
        response = connect(client, auth(user, device), key, exitServerId=exit_id)
        return response.status_code, (response.get_json().get("error") or {}).get("code")

    assert go("u", "d1", KEY_A, "exit-1") == (200, None)
    assert go("u", "d1", KEY_A, "exit-2") == (200, None)
    rules, registered = dict(fake_helper.rules), list(exit_api.calls)
    assert go("u", "d1", KEY_A, "exit-3") == (429, "BRIDGE_LIMIT")  # a third exit for the device
    assert fake_helper.rules == rules and exit_api.calls == registered  # refused before anything happened
    assert "exit-3" not in [r[0] for r in bridge_rows(application)]
    assert go("u", "d1", KEY_A, "exit-1") == (200, None)   # an exit it used is fine
    assert go("u", "d2", KEY_B, "exit-3") == (200, None)   # the user's third
    assert go("u", "d2", KEY_B, "exit-4") == (429, "BRIDGE_LIMIT")  # a fourth for the user
    assert go("v", "d1", make_key(3), "exit-4") == (200, None)  # another user is not affected
    # Past the grace period only the exits the devices still use count ...
    db = sqlite3.connect(application.config["DB_PATH"], isolation_level=None)
    db.execute("UPDATE bridge_uses SET used_at = used_at - ?", (application.config["BRIDGE_IDLE_GRACE"] + 1,))
    db.close()
    assert go("u", "d2", KEY_B, "exit-4") == (200, None)  # the user still uses exit-1 (d1) and exit-3 (d2)
    # ... and one a device just left, whose tunnel stays up for the grace period.
    assert go("u", "d1", KEY_A, "exit-5") == (429, "BRIDGE_LIMIT")  # exit-1, exit-3 (left by d2), exit-4
    assert go("u", "d1", KEY_A, "exit-4") == (200, None)


@pytest.fixture
def exit_api_for(monkeypatch):
    from app import create_app
    from tests.conftest import FakeHelper

    def make(settings):
        for name in [n for n in __import__("os").environ if n.startswith("ORBMESH_")]:
            monkeypatch.delenv(name)
        application = create_app(settings)
        application.fake_helper = application.extensions["orbmesh_helper"] = FakeHelper()
        application.exit_api = application.extensions["orbmesh_bridges"].client = FakeExitClient()
        return application
    return make


def test_smartconnect_falls_back_to_direct_at_the_exit_limit(settings, tmp_path, exit_api_for):
    application = exit_api_for(dict(settings, BRIDGE_EXITS_PER_DEVICE=1))
    many_exits(tmp_path, 2)
    client = application.test_client()
    from app.api.auth import mint_device_token
    headers = {"Authorization": "Bearer " + mint_device_token(application.config, "u", "d")}
    assert connect(client, headers, KEY_A, exitServerId="exit-2").get_json()["mode"] == "bridge"
    # The policy recommends exit-1 for this address; the device is at its limit, so: directly.
    body = connect(client, headers, KEY_A, real_ip="203.0.113.9").get_json()
    assert (body["success"], body["mode"]) == (True, "direct")
    asked = connect(client, headers, KEY_A, exitServerId="exit-1")  # asked for by name: the refusal stands
    assert asked.status_code == 429 and asked.get_json()["error"]["code"] == "BRIDGE_LIMIT"


def test_a_tunnel_reopened_during_the_exits_remove_peer_is_registered_again(client, auth, fake_helper, exit_api,
                                                                            app):
    """The remove-peer runs outside the lock: a connect may reopen the tunnel (and register) meanwhile,
    and the exit may see our remove-peer after its add-peer, so the teardown registers once more."""
    connect(client, auth("u", "d1"), KEY_A, exitServerId="exit-1")
    client.post("/wireguard/disconnect", headers=auth("u", "d1"))
    bridges = app.extensions["orbmesh_bridges"]
    db = sqlite3.connect(app.config["DB_PATH"], isolation_level=None)
    db.execute("UPDATE bridges SET idle_since = idle_since - 3600")
    real_unregister = exit_api.unregister

    def unregister_while_a_connect_reopens(exit, user, public_key):
        assert connect(client, auth("u", "d2"), KEY_B, exitServerId="exit-1").status_code == 200
        real_unregister(exit, user, public_key)

    exit_api.unregister = unregister_while_a_connect_reopens
    try:
        bridges.tick(db, fake_helper)
    finally:
        db.close()
    assert names(exit_api.calls)[-3:] == ["register", "unregister", "register"]
    assert exit_api.calls[-1] == ("register", "exit-1", USER, BRIDGE_KEY)
    assert [r[0] for r in bridge_rows(app)] == ["exit-1"] and fake_helper.rules == {"10.8.0.3": 0}
