"""Bad input on every endpoint: a 4xx envelope, and nothing changes."""
import base64
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import SECRET, make_key

KEY = make_key(1)
KEY_31 = base64.b64encode(b"k" * 31).decode()
KEY_33 = base64.b64encode(b"k" * 33).decode()


def device_claims(**changes):
    now = int(time.time())
    claims = {"iss": "orbnet", "sub": "user-1", "device_id": "device-1", "token_type": "device",
              "iat": now, "exp": now + 600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def hs256(claims, key=SECRET, alg="HS256"):
    return jwt.encode(claims, key, algorithm=alg)


def _rsa_token():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return jwt.encode(device_claims(), pem, algorithm="RS256")


def _none_token():
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    import json
    payload = base64.urlsafe_b64encode(json.dumps(device_claims()).encode()).rstrip(b"=").decode()
    return "%s.%s." % (header, payload)


BAD_TOKENS = {
    "absent": None,
    "empty": "",
    "garbage": "not.a.jwt",
    "expired": hs256(device_claims(exp=int(time.time()) - 3600)),
    "not-yet-valid": hs256(device_claims(nbf=int(time.time()) + 3600)),
    "no-exp": hs256(device_claims(exp=None)),
    "wrong-issuer": hs256(device_claims(iss="someone-else")),
    "no-issuer": hs256(device_claims(iss=None)),
    "user-token": hs256(device_claims(token_type=None)),
    "user-type": hs256(device_claims(token_type="user")),
    "no-device": hs256(device_claims(device_id=None)),
    "no-subject": hs256(device_claims(sub=None)),
    "device-not-string": hs256(device_claims(device_id=12)),
    "wrong-secret": hs256(device_claims(), key="another-secret-" + "y" * 32),
    "wrong-algorithm-hs512": hs256(device_claims(), alg="HS512"),
    "wrong-algorithm-rs256": _rsa_token(),
    "alg-none": _none_token(),
    "oversized": "a" * 20000,
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
@pytest.mark.parametrize("path", ["/wireguard/connect", "/wireguard/disconnect"])
def test_bad_device_tokens(client, snapshot, name, path):
    token = BAD_TOKENS[name]
    headers = {} if token is None else {"Authorization": "Bearer " + token}
    before = snapshot()
    response = client.post(path, json={"publicKey": KEY}, headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {"success": False, "error": {
        "code": "UNAUTHORIZED", "message": "Invalid or expired device token"}}
    assert snapshot() == before


def test_basic_scheme_is_not_bearer(client):
    response = client.post("/wireguard/connect", json={"publicKey": KEY},
                           headers={"Authorization": "Basic " + hs256(device_claims())})
    assert response.status_code == 401


def test_token_inside_leeway_is_accepted(client):
    token = hs256(device_claims(exp=int(time.time()) - 5))
    response = client.post("/wireguard/connect", json={"publicKey": KEY},
                           headers={"Authorization": "Bearer " + token})
    assert response.status_code == 200


BAD_KEYS = {"absent": None, "empty": "", "wrong": "orbnet-key-three-0123456789",
            "prefix": "orbnet-key-one", "very-long": "k" * 10000, "non-ascii": "ключ-0123456789abcdef"}
INTERNAL = [("GET", "/wireguard/status", None),
            ("POST", "/wireguard/add-peer", {"userUuid": "u", "publicKey": KEY, "allowedIPs": "10.8.0.9/32",
                                             "assignedIP": "10.8.0.9"}),
            ("POST", "/wireguard/remove-peer", {"userUuid": "u"})]


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
@pytest.mark.parametrize("method,path,body", INTERNAL)
def test_bad_api_keys(client, snapshot, name, method, path, body):
    key = BAD_KEYS[name]
    headers = {} if key is None else {"X-API-Key": key}
    before = snapshot()
    response = client.open(path, method=method, json=body, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "UNAUTHORIZED"
    assert snapshot() == before


def test_device_token_does_not_open_internal_endpoints(client, auth):
    assert client.get("/wireguard/status", headers=auth()).status_code == 401


CONNECT_BODIES = {
    "missing-key": {},
    "key-31-bytes": {"publicKey": KEY_31},
    "key-33-bytes": {"publicKey": KEY_33},
    "key-not-base64": {"publicKey": "!" * 43 + "="},
    "key-url-safe": {"publicKey": KEY.replace("A", "-")[:-2] + "-="},
    "key-number": {"publicKey": 12345},
    "key-null": {"publicKey": None},
    "key-list": {"publicKey": [KEY]},
    "unknown-field": {"publicKey": KEY, "extra": 1},
    "force-direct-string": {"publicKey": KEY, "force_direct": "true"},
    "force-direct-int": {"publicKey": KEY, "force_direct": 1},
    "exit-id-number": {"publicKey": KEY, "exitServerId": 5},
    "exit-id-bad-chars": {"publicKey": KEY, "exitServerId": "../../etc"},
    "exit-id-long": {"publicKey": KEY, "exitServerId": "x" * 200},
}


@pytest.mark.parametrize("name", sorted(CONNECT_BODIES))
def test_connect_bad_bodies(client, auth, snapshot, name):
    before = snapshot()
    response = client.post("/wireguard/connect", json=CONNECT_BODIES[name], headers=auth())
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["code"] == "VALIDATION_ERROR"
    assert snapshot() == before


ADD_PEER_OK = {"userUuid": "usr_abc123", "publicKey": KEY, "allowedIPs": "10.8.0.42/32",
               "assignedIP": "10.8.0.42", "noKeepalive": False}
ADD_PEER_BAD = {
    "missing-user": {"userUuid": None},
    "missing-key": {"publicKey": None},
    "missing-allowed": {"allowedIPs": None},
    "missing-assigned": {"assignedIP": None},
    "key-31-bytes": {"publicKey": KEY_31},
    "key-33-bytes": {"publicKey": KEY_33},
    "user-bad-chars": {"userUuid": "usr abc;rm -rf"},
    "assigned-outside-pool": {"assignedIP": "10.9.0.42", "allowedIPs": "10.9.0.42/32"},
    "assigned-network": {"assignedIP": "10.8.0.0", "allowedIPs": "10.8.0.0/32"},
    "assigned-gateway": {"assignedIP": "10.8.0.1", "allowedIPs": "10.8.0.1/32"},
    "assigned-broadcast": {"assignedIP": "10.8.255.255", "allowedIPs": "10.8.255.255/32"},
    "assigned-not-ip": {"assignedIP": "ten.eight"},
    "assigned-ipv6": {"assignedIP": "fd00::2"},
    "assigned-ipv6-outside-pool6": {"assignedIP": "2001:db8::2a", "allowedIPs": "2001:db8::2a/128"},
    "assigned-ipv6-inside-pool6": {"assignedIP": "fd00:8::2a", "allowedIPs": "10.8.0.42/32,fd00:8::2a/128"},
    "allowed-ipv6-64": {"allowedIPs": "10.8.0.42/32,fd00:8::/64"},
    "allowed-ipv6-only": {"allowedIPs": "fd00:8::2a/128"},
    "allowed-ipv6-other-peer": {"allowedIPs": "10.8.0.42/32,fd00:8::2b/128"},   # 10.8.0.43's /128
    "allowed-ipv6-outside-pool6": {"allowedIPs": "10.8.0.42/32,2001:db8::2a/128"},
    "allowed-ipv6-default-route": {"allowedIPs": "10.8.0.42/32,::/0"},
    "allowed-ipv6-twice": {"allowedIPs": "10.8.0.42/32,fd00:8::2a/128,fd00:8::2b/128"},
    "allowed-mismatch": {"allowedIPs": "10.8.0.43/32"},
    "allowed-whole-pool": {"allowedIPs": "10.8.0.0/16"},
    "allowed-default-route": {"allowedIPs": "0.0.0.0/0"},
    "allowed-garbage": {"allowedIPs": "10.8.0.42/32; reboot"},
    "allowed-list": {"allowedIPs": ["10.8.0.42/32"]},
    "endpoint-hostname": {"endpoint": "evil.example:51820"},
    "endpoint-no-port": {"endpoint": "203.0.113.5"},
    "endpoint-port-0": {"endpoint": "203.0.113.5:0"},
    "endpoint-port-big": {"endpoint": "203.0.113.5:65536"},
    "endpoint-v6-unbracketed": {"endpoint": "2001:db8::1:51820"},
    # A peer is another host (issue 23): never this node's loopback, nor broadcast, multicast or nowhere.
    "endpoint-loopback": {"endpoint": "127.0.0.1:22"},
    "endpoint-loopback-other": {"endpoint": "127.0.0.53:53"},
    "endpoint-loopback-v6": {"endpoint": "[::1]:51820"},
    "endpoint-loopback-v4-mapped": {"endpoint": "[::ffff:127.0.0.1]:22"},
    "endpoint-broadcast": {"endpoint": "255.255.255.255:51820"},
    "endpoint-broadcast-v4-mapped": {"endpoint": "[::ffff:255.255.255.255]:51820"},
    "endpoint-reserved": {"endpoint": "240.0.0.1:51820"},
    "endpoint-multicast": {"endpoint": "224.0.0.251:5353"},
    "endpoint-multicast-v6": {"endpoint": "[ff02::1]:51820"},
    "endpoint-multicast-v4-mapped": {"endpoint": "[::ffff:239.255.255.250]:1900"},
    "endpoint-unspecified": {"endpoint": "0.0.0.0:51820"},
    "endpoint-this-network": {"endpoint": "0.0.0.1:51820"},
    "endpoint-unspecified-v6": {"endpoint": "[::]:51820"},
    "endpoint-unspecified-v4-mapped": {"endpoint": "[::ffff:0.0.0.0]:51820"},
    "no-keepalive-string": {"noKeepalive": "false"},
    "unknown-field": {"persistentKeepalive": 5},
}


@pytest.mark.parametrize("name", sorted(ADD_PEER_BAD))
def test_add_peer_bad_bodies(client, internal, snapshot, name):
    body = dict(ADD_PEER_OK)
    for key, value in ADD_PEER_BAD[name].items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    before = snapshot()
    response = client.post("/wireguard/add-peer", json=body, headers=internal)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["code"] == "VALIDATION_ERROR"
    assert snapshot() == before


@pytest.mark.parametrize("name", sorted(n for n in ADD_PEER_BAD if n.startswith("endpoint-")))
def test_add_peer_bad_endpoint_names_the_field(client, internal, name):
    response = client.post("/wireguard/add-peer", json=dict(ADD_PEER_OK, **ADD_PEER_BAD[name]), headers=internal)
    assert response.status_code == 400
    assert list(response.get_json()["error"]["details"]["fields"]) == ["endpoint"]


@pytest.mark.parametrize("endpoint", ["198.51.100.7:51820", "[2001:db8::7]:51820", "[::ffff:198.51.100.7]:1"])
def test_add_peer_endpoint_of_another_host_is_taken(client, internal, fake_helper, endpoint):
    """The control for the refusals above: the same body with a public endpoint is added."""
    response = client.post("/wireguard/add-peer", json=dict(ADD_PEER_OK, endpoint=endpoint), headers=internal)
    assert response.status_code == 200, response.get_json()
    assert fake_helper.peers[KEY]["endpoint"] is not None


@pytest.mark.parametrize("body", [{}, {"userUuid": ""}, {"userUuid": 7}, {"userUuid": "u", "x": 1},
                                  {"userUuid": "a" * 129}])
def test_remove_peer_bad_bodies(client, internal, snapshot, body):
    before = snapshot()
    response = client.post("/wireguard/remove-peer", json=body, headers=internal)
    assert response.status_code == 400
    assert snapshot() == before


def test_disconnect_rejects_unexpected_body(client, auth, snapshot):
    before = snapshot()
    assert client.post("/wireguard/disconnect", json={"publicKey": KEY}, headers=auth()).status_code == 400
    assert snapshot() == before


RAW_BODIES = {"truncated": b'{"publicKey": ', "not-json": b"publicKey=abc", "array": b"[1, 2]",
              "string": b'"hello"', "nan": b'{"publicKey": NaN}', "bad-utf8": b'{"publicKey": "\xff"}',
              "deep": b"[" * 30000 + b"]" * 30000}


@pytest.mark.parametrize("name", sorted(RAW_BODIES))
@pytest.mark.parametrize("path,who", [("/wireguard/connect", "device"), ("/wireguard/disconnect", "device"),
                                      ("/wireguard/add-peer", "internal"), ("/wireguard/remove-peer", "internal")])
def test_malformed_json(client, auth, internal, snapshot, name, path, who):
    headers = dict(auth() if who == "device" else internal, **{"Content-Type": "application/json"})
    before = snapshot()
    response = client.post(path, data=RAW_BODIES[name], headers=headers)
    assert response.status_code in (400, 413), response.data
    assert response.get_json()["success"] is False
    assert snapshot() == before


@pytest.mark.parametrize("path,who", [("/wireguard/connect", "device"), ("/wireguard/add-peer", "internal")])
def test_oversize_body_is_413(client, auth, internal, snapshot, path, who):
    headers = auth() if who == "device" else internal
    before = snapshot()
    response = client.post(path, data=b'{"publicKey": "' + b"a" * 70000 + b'"}', headers=headers,
                           content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert snapshot() == before
