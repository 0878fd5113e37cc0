"""Asymmetric device tokens, algorithm pinning and HS/RS confusion."""
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from app import create_app
from app.cli import main as cli_main
from tests.conftest import FakeHelper, make_key

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
