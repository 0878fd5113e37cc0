"""Envelope for framework errors, health, OpenAPI, settings, allocator."""
import ipaddress
import sqlite3

import pytest

from app import config as settings
from app import create_app, store
from tests.conftest import SECRET, make_key


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/nowhere", 404, "NOT_FOUND"),
    ("GET", "/wireguard/connect", 405, "METHOD_NOT_ALLOWED"),
    ("DELETE", "/wireguard/status", 405, "METHOD_NOT_ALLOWED"),
    ("PUT", "/health", 405, "METHOD_NOT_ALLOWED"),
])
def test_framework_errors_use_envelope(client, method, path, status, code):
    response = client.open(path, method=method)
    assert response.status_code == status
    body = response.get_json()
    assert body["success"] is False and body["error"]["code"] == code and body["error"]["message"]


def test_unexpected_failure_is_500_envelope_without_traceback(client, auth, app, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")
    monkeypatch.setattr("app.peers.connect_device", boom)
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    assert response.status_code == 500
    assert response.get_json() == {"success": False, "error": {"code": "INTERNAL_ERROR",
                                                               "message": "Internal server error"}}


def test_health_healthy(client):
    body = client.get("/health").get_json()
    assert body["status"] == "healthy"
    assert body["wireguard"]["running"] is True and body["wireguard"]["peerCount"] == 0
    assert body["database"] == {"ok": True} and body["helper"] == {"ok": True}


def test_health_degraded_when_interface_lags_database(client, auth, fake_helper):
    client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    fake_helper.peers.clear()
    assert client.get("/health").get_json()["status"] == "degraded"


def test_health_unhealthy_without_helper(client, fake_helper):
    fake_helper.fail = "unavailable"
    response = client.get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy" and body["error"]["code"] == "HELPER_UNAVAILABLE"


def test_openapi_covers_every_route(client, app):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes == set(doc["paths"])
    connect = doc["paths"]["/wireguard/connect"]["post"]
    assert {"200", "400", "401", "409", "413", "500", "502", "503"} <= set(connect["responses"])
    assert doc["components"]["schemas"]["Connect"]["required"] == ["publicKey"]
    assert "publicKey" in doc["components"]["schemas"]["AddPeer"]["properties"]


@pytest.mark.parametrize("secret", ["", "changeme", "secret", "short-but-real"])
def test_refuses_to_start_with_placeholder_secret(tmp_path, secret):
    with pytest.raises(settings.ConfigError, match="JWT_SECRET"):
        create_app({"DB_PATH": str(tmp_path / "db"), "JWT_SECRET": secret, "RECONCILE_CHECK_INTERVAL": 0})


def test_refuses_short_api_key(tmp_path):
    with pytest.raises(settings.ConfigError, match="API_KEYS"):
        create_app({"DB_PATH": str(tmp_path / "db"), "JWT_SECRET": SECRET, "API_KEYS": ["short"],
                    "RECONCILE_CHECK_INTERVAL": 0})


def test_settings_from_file_and_environment(tmp_path):
    path = tmp_path / "orbmesh.env"
    path.write_text("# comment\nORBMESH_MTU=1380\nORBMESH_POOL='10.66.0.0/24'\nORBMESH_DNS=9.9.9.9\n")
    values = settings.load({"ORBMESH_CONFIG_FILE": str(path), "ORBMESH_MTU": "1280"})
    assert values["MTU"] == 1280 and values["POOL"] == "10.66.0.0/24"
    assert values["GATEWAY"] == "10.66.0.1" and values["DNS"] == ["9.9.9.9"]


@pytest.mark.parametrize("name,value", [("MTU", "100"), ("POOL", "10.8.0.1/16"), ("LISTEN_PORT", "x"),
                                        ("GATEWAY", "10.9.0.1"), ("JWT_ALGORITHM", "none")])
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(settings.ConfigError, match="ORBMESH_" + name):
        settings.load({"ORBMESH_" + name: value})


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "alloc.db")
    store.init_schema(path)
    conn = store.connect(path)
    yield conn
    conn.close()


def _take(db, allocator, n, start=0):
    out = []
    for i in range(n):
        with store.write(db):
            addr = allocator.allocate(db)
            store.insert(db, {"public_key": make_key(start + i), "addr": addr, "user_id": "u",
                              "device_id": "d%d" % (start + i), "source": "client", "endpoint": None,
                              "keepalive": 0})
        out.append(str(ipaddress.IPv4Address(addr)))
    return out


def test_allocator_never_hands_out_reserved_addresses(db):
    allocator = store.Allocator("10.8.0.0/29", "10.8.0.1")
    assert allocator.size == 5
    assert _take(db, allocator, 5) == ["10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.5", "10.8.0.6"]
    with store.write(db), pytest.raises(store.PoolExhausted):
        allocator.allocate(db)
    assert allocator.free(db) == 0


def test_allocator_gateway_in_the_middle(db):
    allocator = store.Allocator("10.8.0.0/29", "10.8.0.4")
    assert sorted(_take(db, allocator, 5)) == ["10.8.0.1", "10.8.0.2", "10.8.0.3", "10.8.0.5", "10.8.0.6"]


def test_allocator_wraps_to_freed_addresses(db):
    allocator = store.Allocator("10.8.0.0/29", "10.8.0.1")
    _take(db, allocator, 5)
    db.execute("DELETE FROM peers WHERE addr = ?", (int(ipaddress.IPv4Address("10.8.0.3")),))
    assert _take(db, allocator, 1, start=50) == ["10.8.0.3"]


def test_allocator_does_not_scan_the_pool(db):
    """With 20,000 taken addresses, one allocation costs a handful of statements."""
    allocator = store.Allocator("10.8.0.0/16", "10.8.0.1")
    first = allocator.first + 1  # after the gateway
    with store.write(db):
        db.executemany("INSERT INTO peers (public_key, addr, user_id, device_id, source, keepalive, created_at,"
                       " updated_at) VALUES (?, ?, 'u', ?, 'client', 0, 0, 0)",
                       [(make_key(i), first + i, "d%d" % i) for i in range(20000)])
        store.set_meta(db, "next_addr", first + 20000)
    steps = []
    db.set_progress_handler(lambda: steps.append(1), 1000)
    with store.write(db):
        addr = allocator.allocate(db)
    db.set_progress_handler(None, 0)
    assert addr == first + 20000
    # A scan of 20,000 index entries would take well over 20 callbacks of 1,000 VM steps.
    assert len(steps) < 20


def test_locked_database_is_a_clean_503(client, auth, app, snapshot):
    """Another process holds the write lock past the busy timeout: 503, nothing written."""
    before = snapshot()
    app.config["DB_BUSY_TIMEOUT"] = 0.2
    blocker = sqlite3.connect(app.config["DB_PATH"], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "DATABASE_UNAVAILABLE"
    assert snapshot() == before


def test_cli_mints_a_token_the_app_accepts(app, monkeypatch, capsys):
    from app.auth import verify_device_token
    from app.cli import main
    monkeypatch.setenv("ORBMESH_JWT_SECRET", app.config["JWT_SECRET"])
    assert main(["token", "--user", "u-7", "--device", "d-9", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify_device_token(token, app.config) == ("u-7", "d-9")


def test_cli_refuses_placeholder_secret(monkeypatch, capsys):
    from app.cli import main
    monkeypatch.setenv("ORBMESH_JWT_SECRET", "changeme")
    assert main(["token", "--user", "u", "--device", "d"]) == 2
    captured = capsys.readouterr()
    assert "JWT_SECRET" in captured.err and captured.out == ""
