"""Bridge mode and SmartConnect in the app: registry, policy, connect/disconnect,
reconcile and idle teardown, against a real database, a fake helper and a fake exit API."""
import http.server
import json
import logging
import os
import sqlite3
import stat
import threading

import pytest

from app import exits, smartconnect
from app.config import ConfigError
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
    assert connect(client, auth(), KEY_A, force_direct=True).get_json()["mode"] == "direct"
    assert connect(client, auth(), KEY_A, exitServerId="exit-1").get_json()["ip"] == "10.8.0.2/32"
    assert fake_helper.rules == {"10.8.0.2": 0}
    assert connect(client, auth(), KEY_A, force_direct=True).get_json()["mode"] == "direct"
    assert fake_helper.rules == {}
    assert list(fake_helper.peers) == [KEY_A]


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


def test_recommend_rules():
    rules = smartconnect.PolicySchema().load({"rules": [
        {"networks": ["198.51.100.0/24", "2001:db8::/32"], "exits": ["a", "b"]},
        {"networks": ["0.0.0.0/0"], "exits": ["c"]}]})["rules"]
    registry = type("R", (), {"get": lambda self, i: {"id": i} if i != "a" else None})()
    assert smartconnect.recommend(rules, "198.51.100.7", registry, lambda e: True)["id"] == "b"
    assert smartconnect.recommend(rules, "2001:db8::1", registry, lambda e: True)["id"] == "b"
    assert smartconnect.recommend(rules, "192.0.2.1", registry, lambda e: True)["id"] == "c"
    assert smartconnect.recommend(rules, "198.51.100.7", registry, lambda e: e["id"] != "b") is None
    assert smartconnect.recommend(rules, "::1", registry, lambda e: True) is None
    assert smartconnect.recommend(rules, "unix-socket", registry, lambda e: True) is None


@pytest.mark.parametrize("text", ['{"rules": [{"networks": ["nope"], "exits": []}]}',
                                  '{"rules": [{"networks": [], "exits": []}]}',
                                  '{"rules": [{"networks": ["0.0.0.0/0"], "exits": ["bad id!"]}]}',
                                  '{"rulez": []}', "[1, 2]", "not json"])
def test_bad_policy_stops_the_app(tmp_path, text):
    path = tmp_path / "policy.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="ORBMESH_SMARTCONNECT_POLICY"):
        smartconnect.load_policy(str(path))


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


# --- the registry ----------------------------------------------------------------

def test_parse_skips_bad_entries_without_logging_values(caplog):
    bad = [dict(EXIT, id="no-key", publicKey="AAAA"), dict(EXIT, id="dup"), dict(EXIT, id="dup"),
           dict(EXIT, id="mc", bridgeAddress="224.0.0.1"), "junk", dict(EXIT, id="x", apiUrl="ftp://h/"),
           {k: v for k, v in EXIT.items() if k != "apiKey"}, dict(EXIT, extra="ignored")]
    with caplog.at_level(logging.WARNING):
        parsed = exits.parse({"exits": bad})
    assert sorted(parsed) == ["dup", "exit-1"]
    assert parsed["exit-1"]["apiUrl"] == "http://198.51.100.1:8080" and "extra" not in parsed["exit-1"]
    text = caplog.text
    assert "skipping entry 0 (no-key): bad publicKey" in text and "duplicate id" in text
    assert "bad apiUrl" in text and "bad bridgeAddress" in text and "(no id)" in text
    assert API_KEY not in text
    with pytest.raises(ValueError):
        exits.parse({"exits": "x"})


def _config(tmp_path, **extra):
    config = {"EXIT_REGISTRY_URL": "", "EXIT_REGISTRY_FILE": "", "EXIT_REGISTRY_INTERVAL": 0.1,
              "EXIT_REGISTRY_CACHE": str(tmp_path / "cache.json"), "EXIT_API_TIMEOUT": 2.0}
    config.update(extra)
    return config


def test_file_registry_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "exits.json"
    path.write_text(json.dumps([EXIT]))
    registry = exits.Registry(_config(tmp_path, EXIT_REGISTRY_FILE=str(path)))
    assert registry.get("exit-1")["bridgeAddress"] == "10.9.255.1"
    path.write_text(json.dumps([dict(EXIT, id="exit-2", bridgeAddress="10.9.255.2")]))
    os.utime(path, ns=(1, 1))
    assert registry.get("exit-1") is None and registry.get("exit-2")
    path.write_text("{broken")
    os.utime(path, ns=(2, 2))
    assert registry.get("exit-2")  # an unreadable file keeps the last good copy


@pytest.fixture
def orbnet():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"exits": [EXIT]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_url_registry_cached_copy_survives_orbnet_down_and_restart(tmp_path, orbnet, caplog):
    url = "http://127.0.0.1:%d/exits" % orbnet.server_address[1]
    config = _config(tmp_path, EXIT_REGISTRY_URL=url)
    registry = exits.Registry(config)
    assert registry.get("exit-1")["endpoint"] == "198.51.100.1:51820"
    cache = tmp_path / "cache.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    orbnet.shutdown()
    orbnet.server_close()
    registry.refresh(force=True)
    assert registry.get("exit-1")  # OrbNET down: the last good copy
    restarted = exits.Registry(config)
    assert restarted.exits and restarted.get("exit-1")  # after a restart, from the disk copy
    assert "keeping the last good copy" in caplog.text and API_KEY not in caplog.text


def test_exit_client_never_follows_redirects_with_the_key(tmp_path):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append((self.path, self.headers.get("X-API-Key")))
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = exits.ExitClient({"EXIT_API_TIMEOUT": 2.0, "SMARTCONNECT_HEALTH_TTL": 0})
        target = dict(EXIT, apiUrl="http://127.0.0.1:%d" % server.server_address[1])
        with pytest.raises(ApiError) as info:
            client.register(target, "me", BRIDGE_KEY)
        assert info.value.code == "BRIDGE_UNAVAILABLE"
        assert seen == [("/wireguard/add-peer", API_KEY)]
        assert client.healthy(dict(EXIT, apiUrl="http://127.0.0.1:1")) is False
    finally:
        server.shutdown()
        server.server_close()


def test_an_existing_database_gains_mode_and_exit_columns(tmp_path):
    from app import store
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript(store.SCHEMA.replace("CREATE TABLE IF NOT EXISTS bridges", "CREATE TABLE IF NOT EXISTS b_"))
    old.execute("INSERT INTO peers (public_key, addr, user_id, device_id, source, keepalive, created_at, updated_at)"
                " VALUES (?, 167772162, 'u', 'd', 'client', 0, 1, 1)", (KEY_A,))
    old.commit()
    old.close()
    store.init_schema(path)
    store.init_schema(path)  # twice: nothing to add the second time
    db = store.connect(path)
    try:
        (peer,) = store.all_peers(db)
    finally:
        db.close()
    assert (peer.public_key, peer.mode, peer.exit_id) == (KEY_A, "direct", None)
