"""GET /health: healthy, degraded when the interface lags the database, unhealthy without the helper."""
from tests.conftest import make_key


def test_health_healthy(client):
    body = client.get("/health").get_json()
    assert body["status"] == "healthy"
    assert body["wireguard"]["running"] is True and body["wireguard"]["peerCount"] == 0
    assert body["wireguard"]["gateway6"] == "fd00:8::1"
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
    assert body["wireguard"]["gateway6"] is None
