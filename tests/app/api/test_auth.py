"""Asymmetric device tokens, algorithm pinning and HS/RS confusion; scoped API keys."""
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from app import create_app
from app.config import ConfigError
from app.ops.cli import main as cli_main
from tests.conftest import API_KEYS, FakeHelper, make_key

PRIVATE = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}


def pem_pair(algorithm, tmp_path):
    private = PRIVATE[algorithm]()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "private.pem").write_bytes(private_pem)
    (tmp_path / "public.pem").write_bytes(public_pem)
    return private_pem, public_pem


@pytest.fixture(params=sorted(PRIVATE))
def asym(request, tmp_path, monkeypatch):
    for name in ("ORBMESH_JWT_SECRET", "ORBMESH_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    private_pem, public_pem = pem_pair(request.param, tmp_path)
    settings = {"DB_PATH": str(tmp_path / "db"), "JWT_ALGORITHM": request.param,
                "JWT_PUBLIC_KEY_FILE": str(tmp_path / "public.pem"), "RECONCILE_CHECK_INTERVAL": 0}
    application = create_app(settings)
    application.extensions["orbmesh_helper"] = FakeHelper()
    return request.param, application, private_pem, public_pem


def claims():
    now = int(time.time())
    return {"iss": "orbnet", "sub": "u1", "device_id": "d1", "token_type": "device", "exp": now + 300}


def post_connect(application, token):
    return application.test_client().post("/wireguard/connect", json={"publicKey": make_key(1)},
                                          headers={"Authorization": "Bearer " + token})


def test_pinned_asymmetric_algorithm_accepts_its_tokens(asym):
    algorithm, application, private_pem, _ = asym
    assert post_connect(application, jwt.encode(claims(), private_pem, algorithm=algorithm)).status_code == 200


def test_hs256_signed_with_the_public_key_is_refused(asym):
    """The classic confusion: an attacker signs HS256 with the (public) verification key."""
    _, application, _, public_pem = asym
    import base64
    import hashlib
    import hmac
    import json
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest())
    token = b".".join([header, payload, signature.rstrip(b"=")]).decode()
    response = post_connect(application, token)
    assert response.status_code == 401
    assert response.get_json()["error"]["message"] == "Invalid or expired device token"


def test_token_from_another_key_pair_is_refused(asym, tmp_path):
    algorithm, application, _, _ = asym
    other = PRIVATE[algorithm]().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
    assert post_connect(application, jwt.encode(claims(), other, algorithm=algorithm)).status_code == 401


def test_cli_mints_with_a_private_key(asym, tmp_path, monkeypatch, capsys):
    algorithm, application, _, _ = asym
    monkeypatch.setenv("ORBMESH_JWT_ALGORITHM", algorithm)
    assert cli_main(["token", "--user", "u1", "--device", "d1",
                     "--private-key", str(tmp_path / "private.pem")]) == 0
    assert post_connect(application, capsys.readouterr().out.strip()).status_code == 200


# --- scoped API keys: add and remove the peers of one userUuid, nothing else ----

SCOPED = "scoped-key-of-an-entry-0123456789"
ENTRY_USER = "orbmesh-bridge-entry-a"


@pytest.fixture
def scoped(settings):
    return dict(settings, SCOPED_API_KEYS=["%s=%s" % (SCOPED, ENTRY_USER)])


@pytest.fixture
def scoped_client(scoped, monkeypatch):
    for name in [n for n in os.environ if n.startswith("ORBMESH_")]:
        monkeypatch.delenv(name)
    application = create_app(scoped)
    application.extensions["orbmesh_helper"] = FakeHelper()
    return application.test_client()


def peer_body(user, key, address):
    return {"userUuid": user, "publicKey": key, "allowedIPs": address + "/32", "assignedIP": address}


def test_a_scoped_key_adds_and_removes_the_peers_of_its_user_only(scoped_client):
    key = {"X-API-Key": SCOPED}
    full = {"X-API-Key": API_KEYS[0]}
    post = scoped_client.post
    assert post("/wireguard/add-peer", json=peer_body("someone", make_key(2), "10.8.9.2"), headers=full).status_code == 200
    answer = post("/wireguard/add-peer", json=peer_body(ENTRY_USER, make_key(1), "10.8.9.1"), headers=key)
    assert answer.status_code == 200, answer.get_json()
    refused = [
        post("/wireguard/add-peer", json=peer_body("someone", make_key(3), "10.8.9.3"), headers=key),
        post("/wireguard/remove-peer", json={"userUuid": "someone"}, headers=key),
        post("/wireguard/remove-peer", json={"userUuid": "someone", "publicKey": make_key(2)}, headers=key),
        scoped_client.get("/wireguard/status", headers=key),
        scoped_client.get("/metrics", headers=key),
    ]
    assert [(r.status_code, r.get_json()["error"]["code"]) for r in refused] == [(403, "FORBIDDEN")] * 5
    # One peer per scoped user: an entry has one bridge key, and a leaked key cannot fill the pool.
    second = post("/wireguard/add-peer", json=peer_body(ENTRY_USER, make_key(4), "10.8.9.4"), headers=key)
    assert second.status_code == 409 and second.get_json()["error"]["code"] == "CONFLICT"
    assert post("/wireguard/add-peer", json=peer_body(ENTRY_USER, make_key(1), "10.8.9.1"),
                headers=key).status_code == 200  # repeating its own add-peer stays idempotent
    assert "wireguard" not in scoped_client.get("/health", headers=key).get_json()
    status = scoped_client.get("/wireguard/status", headers=full).get_json()
    assert status["peerCount"] == 2  # the refusals changed nothing
    assert post("/wireguard/remove-peer", json={"userUuid": ENTRY_USER, "publicKey": make_key(1)},
                headers=key).get_json()["removed"] == 1
    wrong = scoped_client.get("/wireguard/status", headers={"X-API-Key": SCOPED[:-1] + "X"})
    assert wrong.status_code == 401  # not a key at all is still 401


@pytest.mark.parametrize("value,problem", [
    (["no-equals-sign-0123456789"], "KEY=userUuid"),
    (["short=" + ENTRY_USER], "16"),
    (["changeme-changeme=bad user"], "userUuid"),
    ([API_KEYS[0] + "=" + ENTRY_USER], "also a full"),
    ([SCOPED + "=a", SCOPED + "=b"], "twice"),
])
def test_bad_scoped_keys_refuse_to_start_without_showing_the_key(settings, value, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        create_app(dict(settings, SCOPED_API_KEYS=value))
    assert "SCOPED_API_KEYS" in str(info.value)
    for item in value:
        assert item.split("=")[0] not in str(info.value)


def test_scoped_keys_from_a_file(settings, tmp_path):
    path = tmp_path / "scoped"
    path.write_text("  # entry a\n%s=%s\n\n" % (SCOPED, ENTRY_USER))
    application = create_app(dict(settings, SCOPED_API_KEYS_FILE=str(path)))
    assert application.config["SCOPED_API_KEYS"] == {SCOPED: ENTRY_USER}


# --- VerifiedTokens: a verified token is not decoded again until it expires ---

def hs_token(app, **extra):
    return jwt.encode(dict(claims(), **extra), app.config["JWT_SECRET"], algorithm="HS256")


def test_a_verified_token_is_decoded_once(app, monkeypatch):
    from app.api import auth

    tokens, token = auth.VerifiedTokens(), hs_token(app)
    decodes = []
    real = jwt.decode
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: decodes.append(1) or real(*a, **k))
    assert [tokens.verify(token, app.config) for _ in range(3)] == [("u1", "d1")] * 3
    assert len(decodes) == 1


def test_a_cached_token_is_refused_once_it_expires(app, monkeypatch):
    from app.api import auth

    tokens = auth.VerifiedTokens()
    token = hs_token(app, exp=int(time.time()) + 5)
    assert tokens.verify(token, app.config) == ("u1", "d1")
    later = time.time() + 5 + app.config["JWT_LEEWAY"] + 1
    monkeypatch.setattr(auth.time, "time", lambda: later)
    monkeypatch.setattr(jwt.api_jwt, "datetime", _frozen_datetime(later))
    with pytest.raises(auth.ApiError) as refused:
        tokens.verify(token, app.config)
    assert refused.value.code == "UNAUTHORIZED"


def _frozen_datetime(when):
    import datetime as real

    class Frozen(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime.fromtimestamp(when, tz)
    return Frozen


def test_refused_tokens_are_not_cached_and_the_cache_is_bounded(app, monkeypatch):
    from app.api import auth

    tokens = auth.VerifiedTokens()
    bad = hs_token(app, token_type="user")
    for _ in range(2):
        with pytest.raises(auth.ApiError):
            tokens.verify(bad, app.config)
    assert tokens._entries == {}
    monkeypatch.setattr(auth.VerifiedTokens, "SIZE", 3)
    for i in range(7):
        tokens.verify(hs_token(app, sub="u%d" % i), app.config)
        assert len(tokens._entries) <= 3
    # Keyed by digest: no token is kept.
    assert all(len(key) == 32 for key in tokens._entries)


def test_the_cache_serves_requests_and_a_bad_token_still_gets_401(client, app):
    token = hs_token(app)
    for _ in range(2):
        reply = client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                            headers={"Authorization": "Bearer " + token})
        assert reply.status_code == 200, reply.get_json()
    assert len(app.extensions["orbmesh_tokens"]._entries) == 1
    reply = client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                        headers={"Authorization": "Bearer " + token[:-2] + "xx"})
    assert reply.status_code == 401 and reply.get_json()["error"]["code"] == "UNAUTHORIZED"
