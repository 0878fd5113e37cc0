"""Rate limits per device (connect, new tunnel sessions) and the device cap per user."""
import sqlite3
import threading

import pytest
from wsproto.events import AcceptConnection

from app import create_app
from app.api.ratelimit import FixedWindow
from tests.app.tunnel.test_wsconn import read_events
from tests.app.tunnel.wspair import pair
from tests.conftest import FakeHelper, make_key

LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_app(settings, **changes):
    application = create_app(dict(settings, **changes))
    application.extensions["orbmesh_helper"] = FakeHelper()
    return application


def test_fixed_window_counts_resets_and_forgets():
    clock = Clock()
    window = FixedWindow(3, 60, clock=clock)
    assert [window.hit("a") for _ in range(4)] == [(True, 2, 60), (True, 1, 60), (True, 0, 60), (False, 0, 60)]
    assert window.hit("b") == (True, 2, 60)  # another key has its own count
    clock.now += 59.5
    assert window.hit("a") == (False, 0, 1)
    clock.now += 0.5
    assert window.hit("a") == (True, 2, 60)  # a new window
    clock.now += 61
    window.hit("c")
    assert len(window) == 1  # the finished windows of a and b were dropped


def test_connect_carries_headers_and_is_refused_over_the_limit(settings, auth):
    app = make_app(settings, CONNECT_RATE_LIMIT=3)
    client = app.test_client()
    statuses = []
    for i in range(3):
        response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
        statuses.append(response.status_code)
        assert [response.headers[h] for h in LIMIT_HEADERS] == ["3", str(2 - i), "60"]
        assert "Retry-After" not in response.headers
    assert statuses == [200, 200, 200]
    helper_calls = len(app.extensions["orbmesh_helper"].calls)
    response = client.post("/wireguard/connect", json={"publicKey": make_key(2)}, headers=auth())
    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "RATE_LIMITED"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["Retry-After"] == response.headers["X-RateLimit-Reset"]
    # Refused before any work: the key was not changed, the helper not called.
    assert len(app.extensions["orbmesh_helper"].calls) == helper_calls
    db = sqlite3.connect(app.config["DB_PATH"])
    assert db.execute("SELECT public_key FROM peers").fetchall() == [(make_key(1),)]
    # Per device: another device of the same user is not affected.
    other = client.post("/wireguard/connect", json={"publicKey": make_key(3)}, headers=auth(device="device-2"))
    assert other.status_code == 200 and other.headers["X-RateLimit-Remaining"] == "2"


def test_bad_requests_count_but_unauthenticated_ones_do_not(settings, auth):
    client = make_app(settings, CONNECT_RATE_LIMIT=2).test_client()
    for _ in range(5):
        response = client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                               headers={"Authorization": "Bearer junk"})
        assert response.status_code == 401 and "X-RateLimit-Limit" not in response.headers
    assert client.post("/wireguard/connect", json={"publicKey": "junk"}, headers=auth()).status_code == 400
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth()).status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth()).status_code == 429


def test_zero_turns_a_limit_off(settings, auth):
    client = make_app(settings, CONNECT_RATE_LIMIT=0).test_client()
    for _ in range(30):
        response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
        assert response.status_code == 200 and "X-RateLimit-Limit" not in response.headers


def test_disconnect_and_internal_endpoints_are_not_limited(settings, auth, internal):
    client = make_app(settings, CONNECT_RATE_LIMIT=1).test_client()
    for _ in range(3):
        assert "X-RateLimit-Limit" not in client.post("/wireguard/disconnect", headers=auth()).headers
        assert client.get("/wireguard/status", headers=internal).status_code == 200


def test_new_http_tunnel_sessions_are_limited_existing_ones_are_not(settings, auth):
    app = make_app(settings, TUNNEL_RATE_LIMIT=2, TUNNEL_MAX_SESSIONS=10, TUNNEL_HOLD=0)
    client = app.test_client()

    def post(session):
        return client.post("/wireguard/tunnel", data=b"", content_type="application/octet-stream",
                           headers=dict(auth(), **{"X-Tunnel-Session": session}))

    first = post("one")
    assert first.status_code == 204 and first.headers["X-RateLimit-Remaining"] == "1"
    again = post("one")  # the same session: not a new one, not counted
    assert again.status_code == 204 and "X-RateLimit-Limit" not in again.headers
    assert post("two").headers["X-RateLimit-Remaining"] == "0"
    refused = post("three")
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "RATE_LIMITED"
    assert "Retry-After" in refused.headers
    sessions = app.extensions["orbmesh_http_sessions"]
    assert len(sessions) == 2 and app.extensions["orbmesh_tunnel_slots"].held(("user-1", "device-1")) == 2
    assert post("one").status_code == 204  # existing sessions keep working
    sessions.reap(now=float("inf"))


def test_websocket_upgrade_is_limited_and_refusal_holds_no_slot(settings, auth):
    app = make_app(settings, TUNNEL_RATE_LIMIT=1)
    client = app.test_client()
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    # The first upgrade is counted; the test client cannot complete it (no socket), which is fine here.
    client.get("/wireguard/ws", headers=dict(auth(), **upgrade))
    refused = client.get("/wireguard/ws", headers=dict(auth(), **upgrade))
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "RATE_LIMITED"
    assert refused.headers["X-RateLimit-Limit"] == "1" and "Retry-After" in refused.headers
    assert app.extensions["orbmesh_tunnel_slots"].held(("user-1", "device-1")) == 0


def test_plain_get_on_the_websocket_endpoint_is_400_and_not_counted(settings, auth):
    app = make_app(settings, TUNNEL_RATE_LIMIT=1)
    client = app.test_client()
    for _ in range(3):
        response = client.get("/wireguard/ws", headers=auth())
        assert response.status_code == 400
        assert "WebSocket upgrade" in response.get_json()["error"]["message"]
        assert "X-RateLimit-Limit" not in response.headers


def test_the_101_carries_the_rate_limit_headers():
    headers = [("X-RateLimit-Limit", "30"), ("X-RateLimit-Remaining", "29"), ("X-RateLimit-Reset", "60")]
    server, client, sock = pair(environ_extra={"orbmesh.handshake_headers": headers})
    accepted = read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    assert [(k.decode(), v.decode()) for k, v in accepted.extra_headers
            if k.lower().startswith(b"x-ratelimit")] == [(k.lower(), v) for k, v in headers]
    server.close()


# --- devices per user -------------------------------------------------------

def test_device_cap_refuses_new_devices_only(settings, auth):
    app = make_app(settings, MAX_DEVICES_PER_USER=2)
    client = app.test_client()
    for n in (1, 2):
        assert client.post("/wireguard/connect", json={"publicKey": make_key(n)},
                           headers=auth(device="d%d" % n)).status_code == 200
    db = sqlite3.connect(app.config["DB_PATH"])
    before = (db.execute("SELECT * FROM peers ORDER BY id").fetchall(),
              db.execute("SELECT * FROM meta").fetchall(), dict(app.extensions["orbmesh_helper"].peers))
    refused = client.post("/wireguard/connect", json={"publicKey": make_key(3)}, headers=auth(device="d3"))
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "DEVICE_LIMIT"
    after = (db.execute("SELECT * FROM peers ORDER BY id").fetchall(),
             db.execute("SELECT * FROM meta").fetchall(), dict(app.extensions["orbmesh_helper"].peers))
    assert after == before  # nothing allocated, nothing sent to the helper
    # Reconnect and rekey of an existing device still work; another user is not affected.
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth(device="d1")).status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(9)}, headers=auth(device="d2")).status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(4)},
                       headers=auth(user="user-2", device="d3")).status_code == 200
    # Disconnect frees a place.
    assert client.post("/wireguard/disconnect", headers=auth(device="d1")).status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(3)}, headers=auth(device="d3")).status_code == 200


def test_orbnet_peers_do_not_count_against_the_cap(settings, auth, internal):
    client = make_app(settings, MAX_DEVICES_PER_USER=1).test_client()
    added = client.post("/wireguard/add-peer", headers=internal, json={
        "userUuid": "user-1", "publicKey": make_key(7), "allowedIPs": "10.8.0.9/32", "assignedIP": "10.8.0.9"})
    assert added.status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth()).status_code == 200


def test_concurrent_connects_cannot_pass_the_cap(settings, token, tmp_path):
    """Two apps on one database (two workers): 40 new devices at once, cap 5."""
    apps = [make_app(settings, MAX_DEVICES_PER_USER=5, CONNECT_RATE_LIMIT=0) for _ in range(2)]
    results = []
    barrier = threading.Barrier(8)

    def worker(n):
        client = apps[n % 2].test_client()
        barrier.wait()
        for i in range(5):
            device = "dev-%d-%d" % (n, i)
            response = client.post("/wireguard/connect", json={"publicKey": make_key(100 * n + i)},
                                   headers={"Authorization": "Bearer " + token("user-1", device)})
            results.append(response.status_code)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(results)) == [200, 403] and results.count(200) == 5
    db = sqlite3.connect(settings["DB_PATH"])
    assert db.execute("SELECT count(*) FROM peers WHERE user_id = 'user-1'").fetchone()[0] == 5


@pytest.mark.parametrize("name,value", [("CONNECT_RATE_LIMIT", "-1"), ("TUNNEL_RATE_LIMIT", "x"),
                                        ("RATE_LIMIT_WINDOW", "0"), ("MAX_DEVICES_PER_USER", "-3")])
def test_bad_limit_settings_are_refused(settings, name, value):
    from app.config import ConfigError
    with pytest.raises(ConfigError, match="ORBMESH_" + name):
        create_app(dict(settings, **{name: value}))


def test_forwarded_addresses_do_not_reset_a_count(settings, auth):
    """The count belongs to the device, whatever address the request claims to come from."""
    client = make_app(settings, CONNECT_RATE_LIMIT=2).test_client()
    codes = [client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                         headers=dict(auth(), **{"X-Real-IP": "203.0.113.%d" % n, "X-Forwarded-For": "198.51.100.%d" % n}))
             .status_code for n in range(3)]
    assert codes == [200, 200, 429]
