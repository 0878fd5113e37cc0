"""GET /health: healthy, degraded when the interface lags the database or the resolver is silent,
unhealthy without the helper; the status for anyone, the details only with an internal API key."""
import pytest

from tests.conftest import FakeHelper, make_key

DETAILS = {"wireguard", "database", "helper", "resolver"}


def test_health_healthy(client, internal):
    body = client.get("/health", headers=internal).get_json()
    assert body["status"] == "healthy"
    assert body["wireguard"]["running"] is True and body["wireguard"]["peerCount"] == 0
    assert body["wireguard"]["gateway6"] == "fd00:8::1" and body["wireguard"]["ipv6"] == "forward"
    assert body["database"] == {"ok": True} and body["helper"] == {"ok": True}
    assert body["resolver"] == {"enabled": True, "address": "10.8.0.1", "ok": True}


def test_health_degraded_when_the_resolver_does_not_answer(client, app, internal):
    app.extensions["orbmesh_resolver"].failure = "no answer within 1s"
    response = client.get("/health", headers=internal)
    body = response.get_json()
    assert response.status_code == 200 and body["status"] == "degraded"
    assert body["resolver"] == {"enabled": True, "address": "10.8.0.1", "ok": False, "error": "no answer within 1s"}
    app.extensions["orbmesh_resolver"].failure = None  # control: answering again, healthy again
    assert client.get("/health").get_json()["status"] == "healthy"


def test_health_ignores_the_resolver_when_it_is_off(client, app, internal):
    app.extensions["orbmesh_resolver"] = None  # what init_app leaves with ORBMESH_DNS_RESOLVER=off
    body = client.get("/health", headers=internal).get_json()
    assert body["status"] == "healthy" and body["resolver"] == {"enabled": False}


def test_health_unhealthy_wins_over_a_silent_resolver(client, app, fake_helper):
    app.extensions["orbmesh_resolver"].failure = "Connection refused"
    fake_helper.fail = "unavailable"
    assert client.get("/health").get_json()["status"] == "unhealthy"


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
    assert detailed.get_json()["wireguard"]["gateway6"] is None
    assert detailed.get_json()["wireguard"]["ipv6"] is None  # unknown without the helper


@pytest.mark.parametrize("helper, ipv6, gateway6", [
    (dict(), "forward", "fd00:8::1"),
    (dict(ipv6="local"), "local", None),  # the node does not forward IPv6: clients get none
    (dict(pool6=None), "off", None),       # ORBMESH_POOL6=off
], ids=["forward", "local", "off"])
def test_health_names_the_ipv6_mode(client, app, internal, helper, ipv6, gateway6):
    app.extensions["orbmesh_helper"] = FakeHelper(**helper)
    body = client.get("/health", headers=internal).get_json()
    assert body["status"] == "healthy"  # no IPv6 is a choice of the host, not a fault
    assert (body["wireguard"]["ipv6"], body["wireguard"]["gateway6"]) == (ipv6, gateway6)
    assert "ipv6" not in client.get("/health").get_json()  # a detail: only with the key
