"""GET /health: healthy, degraded when the interface lags the database or the resolver is silent,
unhealthy without the helper."""
from tests.conftest import make_key


def test_health_healthy(client):
    body = client.get("/health").get_json()
    assert body["status"] == "healthy"
    assert body["wireguard"]["running"] is True and body["wireguard"]["peerCount"] == 0
    assert body["wireguard"]["gateway6"] == "fd00:8::1"
    assert body["database"] == {"ok": True} and body["helper"] == {"ok": True}
    assert body["resolver"] == {"enabled": True, "address": "10.8.0.1", "ok": True}


def test_health_degraded_when_the_resolver_does_not_answer(client, app):
    app.extensions["orbmesh_resolver"].failure = "no answer within 1s"
    response = client.get("/health")
    body = response.get_json()
    assert response.status_code == 200 and body["status"] == "degraded"
    assert body["resolver"] == {"enabled": True, "address": "10.8.0.1", "ok": False, "error": "no answer within 1s"}
    app.extensions["orbmesh_resolver"].failure = None  # control: answering again, healthy again
    assert client.get("/health").get_json()["status"] == "healthy"


def test_health_ignores_the_resolver_when_it_is_off(client, app):
    app.extensions["orbmesh_resolver"] = None  # what init_app leaves with ORBMESH_DNS_RESOLVER=off
    body = client.get("/health").get_json()
    assert body["status"] == "healthy" and body["resolver"] == {"enabled": False}


def test_health_unhealthy_wins_over_a_silent_resolver(client, app, fake_helper):
    app.extensions["orbmesh_resolver"].failure = "Connection refused"
    fake_helper.fail = "unavailable"
    assert client.get("/health").get_json()["status"] == "unhealthy"


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
    assert body["wireguard"]["gateway6"] is None
