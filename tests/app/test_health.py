"""GET /health: healthy, degraded when the interface lags the database, unhealthy without the helper;
the status for anyone, the details only with an internal API key."""
import pytest

from tests.conftest import make_key

DETAILS = {"wireguard", "database", "helper"}


def test_health_healthy(client, internal):
    body = client.get("/health", headers=internal).get_json()
    assert body["status"] == "healthy"
    assert body["wireguard"]["running"] is True and body["wireguard"]["peerCount"] == 0
    assert body["database"] == {"ok": True} and body["helper"] == {"ok": True}


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "not-a-key-0123456789"}, {"X-API-Key": ""}],
                         ids=["no key", "wrong key", "empty key"])
def test_without_a_valid_key_only_the_status(client, internal, headers):
    response = client.get("/health", headers=headers)
    assert response.status_code == 200  # a load balancer needs no key
    assert response.get_json() == {"success": True, "status": "healthy"}
    assert DETAILS <= set(client.get("/health", headers=internal).get_json())  # control: the key shows them


def test_health_degraded_when_interface_lags_database(client, auth, fake_helper, internal):
    client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    fake_helper.peers.clear()
    assert client.get("/health").get_json() == {"success": True, "status": "degraded"}
    body = client.get("/health", headers=internal).get_json()
    assert body["status"] == "degraded" and body["wireguard"]["peerCount"] == 0


def test_health_unhealthy_without_helper(client, fake_helper, internal):
    fake_helper.fail = "unavailable"
    response = client.get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy" and body["error"]["code"] == "HELPER_UNAVAILABLE"
    assert not DETAILS & set(body)
    detailed = client.get("/health", headers=internal)
    assert detailed.status_code == 503 and detailed.get_json()["helper"]["ok"] is False
