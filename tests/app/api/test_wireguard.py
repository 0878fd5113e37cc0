"""The client and OrbNET endpoints against a real database and a fake helper."""
import base64
import ipaddress
import os
import sqlite3

import pytest

from tests.conftest import BRIDGE_KEY, SERVER_KEY, FakeHelper, make_key

KEY_A, KEY_B, KEY_C = make_key(1), make_key(2), make_key(3)


def rows(app):
    db = sqlite3.connect(app.config["DB_PATH"])
    try:
        return db.execute("SELECT public_key, addr, user_id, device_id, source, keepalive, endpoint"
                          " FROM peers ORDER BY addr").fetchall()
    finally:
        db.close()


def connect(client, headers, key, **extra):
    return client.post("/wireguard/connect", json={"publicKey": key, **extra}, headers=headers)


def test_connect_returns_reference_fields(client, auth, fake_helper):
    response = connect(client, auth(), KEY_A)
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["success", "publicKey", "serverPublicKey", "ip", "gateway", "serverEndpoint",
                          "dns", "allowedIPs", "mtu", "keepalive", "mode", "exitServerId", "ip6", "gateway6"]
    # The reference's fields as they were (ip stays the IPv4 /32); IPv6 beside them.
    assert body == {"success": True, "publicKey": KEY_A, "serverPublicKey": SERVER_KEY, "ip": "10.8.0.2/32",
                    "gateway": "10.8.0.1", "serverEndpoint": "198.51.100.1:51820",
                    "dns": ["10.8.0.1", "fd00:8::1", "1.1.1.1"], "allowedIPs": ["0.0.0.0/0", "::/0"], "mtu": 1420,
                    "keepalive": 25, "mode": "direct", "exitServerId": None,
                    "ip6": "fd00:8::2/128", "gateway6": "fd00:8::1"}
    assert fake_helper.peers[KEY_A]["allowed_ips"] == ["10.8.0.2/32", "fd00:8::2/128"]


def test_ipv6_addresses_follow_the_ipv4_offsets(client, auth, fake_helper):
    bodies = [connect(client, auth("u", "d%d" % i), make_key(100 + i)).get_json() for i in range(300)]
    for body in bodies:
        offset = int(ipaddress.ip_address(body["ip"].split("/")[0])) - int(ipaddress.ip_address("10.8.0.0"))
        assert body["ip6"] == "fd00:8::%x/128" % offset
        assert fake_helper.peers[body["publicKey"]]["allowed_ips"] == [body["ip"], body["ip6"]]
    assert len({b["ip6"] for b in bodies}) == 300 and bodies[-1]["ip6"] == "fd00:8::12d/128"  # 10.8.1.45


@pytest.fixture
def settings(settings, request):
    """The usual settings, changed by an indirect parameter where a test gives one."""
    return dict(settings, **getattr(request, "param", {}))


@pytest.mark.parametrize("settings, dns", [
    ({}, ["10.8.0.1", "fd00:8::1", "1.1.1.1"]),
    ({"DNS_RESOLVER": "off"}, ["1.1.1.1"]),                       # no resolver answers on the gateways
    ({"DNS": "9.9.9.9,10.8.0.1"}, ["9.9.9.9", "10.8.0.1"]),      # the operator's list, exactly as given
    ({"DNS": "9.9.9.9"}, ["9.9.9.9"]),
], indirect=["settings"])
def test_dns_gains_the_ipv6_gateway_when_the_resolver_runs(client, auth, dns):
    assert connect(client, auth(), KEY_A).get_json()["dns"] == dns


def test_ipv6_off_gives_nulls_and_the_reference_dns(client, auth, app):
    app.extensions["orbmesh_helper"] = off = FakeHelper(pool6=None)
    body = connect(client, auth(), KEY_A).get_json()
    assert (body["ip"], body["ip6"], body["gateway6"]) == ("10.8.0.2/32", None, None)
    assert body["dns"] == ["10.8.0.1", "1.1.1.1"]  # the reference's default
    assert off.peers[KEY_A]["allowed_ips"] == ["10.8.0.2/32"]
    response = client.get("/wireguard/status", headers={"X-API-Key": app.config["API_KEYS"][0]})
    assert response.get_json()["gateway6"] is None


def test_ipv6_not_forwarded_gives_no_ipv6_but_keeps_all_of_it_in_the_tunnel(client, auth, app, internal):
    """ipv6 mode "local" (the node does not forward IPv6, wghelper/ipv6.py): no address, no /128, no IPv6
    resolver, but ::/0 stays in allowedIPs so the client's IPv6 goes nowhere but into the tunnel."""
    app.extensions["orbmesh_helper"] = local = FakeHelper(ipv6="local")
    body = connect(client, auth(), KEY_A).get_json()
    assert (body["ip"], body["ip6"], body["gateway6"]) == ("10.8.0.2/32", None, None)
    assert body["allowedIPs"] == ["0.0.0.0/0", "::/0"] and body["dns"] == ["10.8.0.1", "1.1.1.1"]
    assert local.peers[KEY_A]["allowed_ips"] == ["10.8.0.2/32"]
    assert client.get("/wireguard/status", headers=internal).get_json()["gateway6"] is None
    # Control: the same node forwarding IPv6 gives the same device both addresses.
    app.extensions["orbmesh_helper"] = forward = FakeHelper(ipv6="forward")
    body = connect(client, auth(), KEY_A).get_json()
    assert (body["ip6"], body["gateway6"]) == ("fd00:8::2/128", "fd00:8::1")
    assert body["dns"] == ["10.8.0.1", "fd00:8::1", "1.1.1.1"]
    assert forward.peers[KEY_A]["allowed_ips"] == ["10.8.0.2/32", "fd00:8::2/128"]
    assert client.get("/wireguard/status", headers=internal).get_json()["gateway6"] == "fd00:8::1"


def test_add_peer_128_without_ipv6_forwarding_is_refused(client, internal, app):
    app.extensions["orbmesh_helper"] = local = FakeHelper(ipv6="local")
    response = client.post("/wireguard/add-peer", json=add_peer_body(allowedIPs="10.8.0.42/32,fd00:8::2a/128"),
                           headers=internal)
    assert response.status_code == 400
    assert "IPv6 is off on this server (ipv6: local)" in response.get_json()["error"]["details"]["fields"][
        "allowedIPs"][0]
    assert local.peers == {}
    assert client.post("/wireguard/add-peer", json=add_peer_body(), headers=internal).status_code == 200
    assert local.peers[KEY_C]["allowed_ips"] == ["10.8.0.42/32"]


@pytest.mark.parametrize("overrides, dns", [
    ({"DNS_RESOLVER": "off"}, ["1.1.1.1"]),  # never sent to a resolver that is not there
    ({"DNS_RESOLVER": "off", "DNS": "10.8.0.1,9.9.9.9"}, ["10.8.0.1", "9.9.9.9"]),  # an explicit list wins
    ({"DNS": "9.9.9.9"}, ["9.9.9.9"]),
    ({"POOL": "10.66.0.0/16"}, ["10.66.0.1", "1.1.1.1"]),
])
def test_connect_dns_follows_the_resolver_setting(settings, monkeypatch, token, overrides, dns):
    from app import create_app
    from tests.conftest import FakeHelper
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    app = create_app(dict(settings, **overrides))
    app.extensions["orbmesh_helper"] = FakeHelper(app.config["POOL"], app.config["GATEWAY"], pool6=None)
    response = connect(app.test_client(), {"Authorization": "Bearer " + token()}, KEY_A)
    assert response.status_code == 200 and response.get_json()["dns"] == dns


def test_same_device_same_key_gets_same_address(client, auth, app):
    first = connect(client, auth(), KEY_A).get_json()
    again = connect(client, auth(), KEY_A).get_json()
    assert first["ip"] == again["ip"]
    assert len(rows(app)) == 1


def test_same_device_new_key_replaces_peer_and_keeps_address(client, auth, app, fake_helper):
    first = connect(client, auth(), KEY_A).get_json()
    second = connect(client, auth(), KEY_B).get_json()
    assert second["ip"] == first["ip"]
    assert set(fake_helper.peers) == {KEY_B}
    assert fake_helper.calls[-1] == ("apply", [fake_helper.peers[KEY_B]], [KEY_A])
    assert [r[0] for r in rows(app)] == [KEY_B]


ZERO_KEY = base64.b64encode(bytes(32)).decode()
ORDER_8_KEY = base64.b64encode(bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880")).decode()


@pytest.mark.parametrize("key", [SERVER_KEY, BRIDGE_KEY, ZERO_KEY, ORDER_8_KEY])
def test_the_servers_own_keys_and_low_order_points_are_refused(client, auth, internal, snapshot, key):
    """The server's own key as a client's left the database and the interface apart for good."""
    before = snapshot()
    for response in (connect(client, auth(), key), client.post("/wireguard/add-peer",
                                                                 json=add_peer_body(publicKey=key), headers=internal)):
        assert response.status_code == 400
        assert response.get_json()["error"]["code"] == "VALIDATION_ERROR"
        assert "publicKey" in response.get_json()["error"]["details"]["fields"]
    assert snapshot() == before
    assert connect(client, auth(), KEY_A).status_code == 200  # control


def test_key_of_another_device_is_conflict(client, auth, snapshot):
    connect(client, auth("user-1", "device-1"), KEY_A)
    before = snapshot()
    response = connect(client, auth("user-2", "device-9"), KEY_A)
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "CONFLICT"
    assert snapshot() == before


def test_devices_get_distinct_addresses(client, auth):
    ips = {connect(client, auth("u", "d%d" % i), make_key(100 + i)).get_json()["ip"] for i in range(20)}
    assert len(ips) == 20


@pytest.mark.parametrize("mode,status,code", [("unavailable", 503, "HELPER_UNAVAILABLE"),
                                               ("failed", 502, "HELPER_ERROR")])
def test_connect_helper_failure_allocates_nothing(client, auth, app, fake_helper, mode, status, code):
    connect(client, auth(), KEY_A)  # warm the server-key cache
    fake_helper.fail = mode
    response = connect(client, auth("user-2", "device-2"), KEY_B)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert [r[0] for r in rows(app)] == [KEY_A]


def test_rekey_helper_failure_restores_old_key(client, auth, app, fake_helper):
    connect(client, auth(), KEY_A)
    fake_helper.fail = "unavailable"
    assert connect(client, auth(), KEY_B).status_code == 503
    assert [r[0] for r in rows(app)] == [KEY_A]


def test_unknown_exit_server_id_is_404_and_changes_nothing(client, auth, snapshot):
    before = snapshot()
    response = connect(client, auth(), KEY_A, exitServerId="exit-de-1")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "EXIT_NOT_FOUND"
    assert snapshot() == before


def test_force_direct_true_connects(client, auth):
    assert connect(client, auth(), KEY_A, force_direct=True).status_code == 200


def test_disconnect_removes_peer_and_is_idempotent(client, auth, app, fake_helper):
    connect(client, auth(), KEY_A)
    for _ in range(2):
        response = client.post("/wireguard/disconnect", headers=auth())
        assert response.status_code == 200
        assert response.get_json() == {"success": True, "message": "Disconnected successfully"}
    assert rows(app) == [] and fake_helper.peers == {}


def test_disconnect_helper_failure_keeps_peer(client, auth, app, fake_helper):
    connect(client, auth(), KEY_A)
    before = rows(app)
    fake_helper.fail = "unavailable"
    assert client.post("/wireguard/disconnect", headers=auth()).status_code == 503
    assert rows(app) == before


@pytest.mark.parametrize("source", ["10.8.0.2", "fd00:8::2"])
def test_disconnect_through_its_own_tunnel_answers_before_the_peer_goes(client, auth, app, fake_helper, source):
    """A full tunnel routes the node's address into the tunnel: an answer sent after the peer had gone would
    never reach the device, so the peer goes once the answer is written."""
    connect(client, auth(), KEY_A)
    # As nginx passes it on (X-Real-IP from loopback, a trusted proxy): the device's own tunnel address.
    response = client.post("/wireguard/disconnect", headers=dict(auth(), **{"X-Real-IP": source}), buffered=False)
    assert response.status_code == 200
    assert response.get_json() == {"success": True, "message": "Disconnected successfully"}
    assert rows(app) == [] and KEY_A in fake_helper.peers  # the row is gone, the peer still carries the answer
    response.close()  # the server has written the answer
    assert fake_helper.peers == {}


def test_disconnect_through_its_tunnel_leaves_a_helper_failure_to_reconcile(client, auth, app, fake_helper):
    connect(client, auth(), KEY_A)
    response = client.post("/wireguard/disconnect", headers=dict(auth(), **{"X-Real-IP": "10.8.0.2"}),
                           buffered=False)
    fake_helper.fail = "unavailable"
    response.close()
    assert response.status_code == 200 and rows(app) == []  # the database, the truth, no longer has it ...
    with app.app_context():
        from app.peers.db import get_db, get_meta
        assert get_meta(get_db(), "reconciled_generation") == ""  # ... and reconcile takes the peer off
    fake_helper.fail = None


@pytest.mark.parametrize("source", ["10.8.0.3", "192.0.2.7", "fd00:8::3"])
def test_disconnect_from_elsewhere_removes_the_peer_before_answering(client, auth, app, fake_helper, source):
    connect(client, auth(), KEY_A)
    response = client.post("/wireguard/disconnect", headers=dict(auth(), **{"X-Real-IP": source}), buffered=False)
    assert response.status_code == 200 and fake_helper.peers == {}  # before the answer is even read
    response.close()


def test_status_reads_live_interface(client, internal, auth):
    connect(client, auth(), KEY_A)
    response = client.get("/wireguard/status", headers=internal)
    assert response.get_json() == {"success": True, "publicKey": SERVER_KEY, "peerCount": 1, "gateway6": "fd00:8::1"}


def test_status_accepts_every_rotated_key(client):
    from tests.conftest import API_KEYS
    for key in API_KEYS:
        assert client.get("/wireguard/status", headers={"X-API-Key": key}).status_code == 200


def add_peer_body(**changes):
    body = {"userUuid": "usr_abc123", "publicKey": KEY_C, "allowedIPs": "10.8.0.42/32",
            "assignedIP": "10.8.0.42", "noKeepalive": False}
    body.update(changes)
    return body


def test_add_peer_and_remove_peer(client, internal, app, fake_helper):
    response = client.post("/wireguard/add-peer", json=add_peer_body(endpoint="203.0.113.5:51820"),
                           headers=internal)
    assert response.get_json() == {"success": True, "message": "Peer added successfully"}
    # OrbNET's peer gets its IPv6 address the same way: 42 = 0x2a.
    assert fake_helper.peers[KEY_C] == {"public_key": KEY_C, "allowed_ips": ["10.8.0.42/32", "fd00:8::2a/128"],
                                        "endpoint": "203.0.113.5:51820", "keepalive": 25}
    assert rows(app)[0][4] == "orbnet"
    response = client.post("/wireguard/remove-peer", json={"userUuid": "usr_abc123"}, headers=internal)
    assert response.get_json() == {"success": True, "message": "Peer removed successfully", "removed": 1}
    assert fake_helper.peers == {} and rows(app) == []


@pytest.mark.parametrize("allowed", ["10.8.0.42/32,fd00:8::2a/128", " fd00:8::002a/128 , 10.8.0.42/32 "])
def test_add_peer_may_name_its_own_128(client, internal, fake_helper, allowed):
    response = client.post("/wireguard/add-peer", json=add_peer_body(allowedIPs=allowed), headers=internal)
    assert response.status_code == 200, response.get_json()
    assert fake_helper.peers[KEY_C]["allowed_ips"] == ["10.8.0.42/32", "fd00:8::2a/128"]


def test_add_peer_128_with_ipv6_off_is_refused(client, internal, app):
    app.extensions["orbmesh_helper"] = off = FakeHelper(pool6=None)
    response = client.post("/wireguard/add-peer", json=add_peer_body(allowedIPs="10.8.0.42/32,fd00:8::2a/128"),
                           headers=internal)
    assert response.status_code == 400
    assert "IPv6 is off" in response.get_json()["error"]["details"]["fields"]["allowedIPs"][0]
    assert off.peers == {}
    assert client.post("/wireguard/add-peer", json=add_peer_body(), headers=internal).status_code == 200
    assert off.peers[KEY_C]["allowed_ips"] == ["10.8.0.42/32"]


def test_add_peer_no_keepalive(client, internal, fake_helper):
    client.post("/wireguard/add-peer", json=add_peer_body(noKeepalive=True), headers=internal)
    assert fake_helper.peers[KEY_C]["keepalive"] == 0


def test_add_peer_is_idempotent_and_allocator_skips_its_address(client, internal, auth, app):
    for _ in range(2):
        assert client.post("/wireguard/add-peer", json=add_peer_body(assignedIP="10.8.0.2",
                           allowedIPs="10.8.0.2/32"), headers=internal).status_code == 200
    assert connect(client, auth(), KEY_A).get_json()["ip"] == "10.8.0.3/32"


@pytest.mark.parametrize("changes", [
    {"publicKey": KEY_A},                                   # key of a client device
    {"publicKey": make_key(77)},                            # address already taken
    {"userUuid": "someone-else"},                           # same key, other user
])
def test_add_peer_conflicts(client, internal, auth, snapshot, changes):
    connect(client, auth(), KEY_A)  # holds 10.8.0.2
    client.post("/wireguard/add-peer", json=add_peer_body(), headers=internal)
    body = add_peer_body(**changes)
    if changes.get("publicKey") == make_key(77):
        body.update(assignedIP="10.8.0.42")
    before = snapshot()
    response = client.post("/wireguard/add-peer", json=body, headers=internal)
    assert response.status_code == 409, response.get_json()
    assert snapshot() == before


def test_add_peer_helper_failure_adds_nothing(client, internal, app, fake_helper):
    fake_helper.fail = "failed"
    assert client.post("/wireguard/add-peer", json=add_peer_body(), headers=internal).status_code == 502
    assert rows(app) == []


def test_remove_peer_removes_every_peer_of_user(client, internal, auth, app):
    connect(client, auth("usr_abc123", "phone"), KEY_A)
    connect(client, auth("usr_abc123", "laptop"), KEY_B)
    connect(client, auth("other", "phone"), make_key(9))
    client.post("/wireguard/add-peer", json=add_peer_body(), headers=internal)
    response = client.post("/wireguard/remove-peer", json={"userUuid": "usr_abc123"}, headers=internal)
    assert response.get_json()["removed"] == 3
    assert [r[2] for r in rows(app)] == ["other"]


def test_remove_peer_with_public_key_removes_only_that_peer(client, internal, auth, app, fake_helper, snapshot):
    """Our extension: the entries of bridge mode share exits, each removes only its own peer."""
    connect(client, auth("usr_abc123", "phone"), KEY_A)
    client.post("/wireguard/add-peer", json=add_peer_body(), headers=internal)
    before = snapshot()
    for body in ({"userUuid": "usr_abc123", "publicKey": make_key(9)},   # not a peer at all
                 {"userUuid": "other", "publicKey": KEY_C}):           # a peer, of another user
        response = client.post("/wireguard/remove-peer", json=body, headers=internal)
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "NOT_FOUND"
    response = client.post("/wireguard/remove-peer", json={"userUuid": "usr_abc123", "publicKey": "AAAA"},
                           headers=internal)
    assert response.status_code == 400 and "publicKey" in response.get_json()["error"]["details"]["fields"]
    assert snapshot() == before
    response = client.post("/wireguard/remove-peer", json={"userUuid": "usr_abc123", "publicKey": KEY_C},
                           headers=internal)
    assert response.get_json() == {"success": True, "message": "Peer removed successfully", "removed": 1}
    assert list(fake_helper.peers) == [KEY_A] and [r[0] for r in rows(app)] == [KEY_A]


def test_remove_peer_unknown_user_is_404(client, internal):
    response = client.post("/wireguard/remove-peer", json={"userUuid": "nobody"}, headers=internal)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "NOT_FOUND"


def test_remove_peer_helper_failure_restores_rows(client, internal, auth, app, fake_helper):
    connect(client, auth("usr_abc123", "phone"), KEY_A)
    before = rows(app)
    fake_helper.fail = "unavailable"
    assert client.post("/wireguard/remove-peer", json={"userUuid": "usr_abc123"},
                       headers=internal).status_code == 503
    assert rows(app) == before


def test_server_key_is_base64_32(client, auth):
    body = connect(client, auth(), KEY_A).get_json()
    assert len(base64.b64decode(body["serverPublicKey"])) == 32
