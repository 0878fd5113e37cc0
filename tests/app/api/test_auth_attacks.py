"""Token and API-key attacks not covered by test_bad_input.py: every one a 401 that changes nothing."""
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from app import create_app
from app.api import auth
from tests.conftest import API_KEYS, SECRET, FakeHelper, make_key


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes):
    now = int(time.time())
    base = {"iss": "orbnet", "sub": "user-1", "device_id": "device-1", "token_type": "device", "iat": now,
            "exp": now + 600}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def unsigned(header, body, signature=""):
    return "%s.%s.%s" % (b64(json.dumps(header).encode()), b64(json.dumps(body).encode()), signature)


def raw_hs256(body):
    """HS256 with the right secret over claims PyJWT would refuse to encode."""
    signing_input = "%s.%s" % (b64(b'{"alg":"HS256","typ":"JWT"}'), b64(json.dumps(body).encode()))
    return signing_input + "." + b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())


def hs(body, key=SECRET, alg="HS256", headers=None):
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def attacks():
    """Built when a test runs: times are relative to now, not to collection."""
    now = int(time.time())
    return {
        # time
        "issued-in-the-future": hs(claims(iat=now + 3600)),
        "iat-not-a-number": hs(claims(iat="yesterday")),
        "exp-not-a-number": hs(claims(exp="tomorrow")),
        "nbf-not-a-number": hs(claims(nbf="now")),
        "nbf-just-past-leeway": hs(claims(nbf=now + 120)),
        "expired-just-past-leeway": hs(claims(exp=now - 120)),
        # issuer and claims
        "issuer-case": hs(claims(iss="OrbNET")),
        "issuer-list": raw_hs256(claims(iss=["orbnet"])),
        "token-type-case": hs(claims(token_type="Device")),
        "token-type-list": hs(claims(token_type=["device"])),
        "subject-path": hs(claims(sub="../../etc/passwd")),
        "subject-too-long": hs(claims(sub="u" * 129)),
        "device-empty": hs(claims(device_id="")),
        "device-newline": hs(claims(device_id="d\nINFO forged log line")),
        "claims-not-an-object": raw_hs256(["device"]),
        # alg none in every spelling, with and without a signature
        "alg-None": unsigned({"alg": "None", "typ": "JWT"}, claims()),
        "alg-NONE": unsigned({"alg": "NONE", "typ": "JWT"}, claims()),
        "alg-nOnE": unsigned({"alg": "nOnE", "typ": "JWT"}, claims()),
        "alg-none-with-signature": unsigned({"alg": "none"}, claims(), b64(b"sig")),
        "alg-missing": unsigned({"typ": "JWT"}, claims(), b64(b"sig")),
        "alg-empty": unsigned({"alg": ""}, claims()),
        # key injection through the header: the key is pinned, header keys are never used
        "embedded-jwk": hs(claims(), key="attacker-secret-" + "a" * 32,
                           headers={"jwk": {"kty": "oct", "k": b64(b"attacker-secret-" + b"a" * 32)}}),
        "jku-kid-injection": hs(claims(), key="attacker-secret-" + "a" * 32,
                                headers={"jku": "http://198.51.100.9/keys", "kid": "../../dev/null"}),
        "hs384-with-the-right-secret": hs(claims(), alg="HS384"),
        # oversized and malformed
        "huge-header-claim": hs(claims(), headers={"kid": "k" * 9000}),
        "huge-claims": hs(claims(pad="p" * 9000)),
        "two-dots-only": "..",
        "four-segments": hs(claims()) + ".extra",
        "not-base64": "eyJ!!!.eyJ!!!.sig",
        "signature-stripped": hs(claims()).rsplit(".", 1)[0] + ".",
        "signature-of-another-token": (hs(claims()).rsplit(".", 1)[0] + "." +
                                       hs(claims(sub="user-2")).rsplit(".", 1)[1]),
    }


@pytest.mark.parametrize("name", sorted(attacks()))
def test_token_attack_is_refused(client, snapshot, name):
    before = snapshot()
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                           headers={"Authorization": "Bearer " + attacks()[name]})
    assert response.status_code == 401
    assert response.get_json() == {"success": False, "error": {
        "code": "UNAUTHORIZED", "message": "Invalid or expired device token"}}
    assert snapshot() == before


def test_the_same_claims_properly_signed_are_accepted(client):
    """Control: the attacks above fail because of what they change, not because the claims are bad."""
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                           headers={"Authorization": "Bearer " + hs(claims())})
    assert response.status_code == 200


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "bearer\t" + "x", "Token abc", "Bearer  " + " " * 10,
                                   "Bearer " + "a" * 100_000])
def test_odd_authorization_headers(client, header):
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers={"Authorization": header})
    assert response.status_code == 401


# Every spelling the app accepts; nginx must send each of them to one instance
# (tests/e2e/test_deploy_e2e.py), so the list is shared.
BEARER_SPELLINGS = ["Bearer {}", "bearer {}", "BEARER {}", "bEaReR    {}", "Bearer \t {} \t"]


@pytest.mark.parametrize("spelling", BEARER_SPELLINGS)
def test_bearer_spellings_the_app_accepts(client, spelling):
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                           headers={"Authorization": spelling.format(hs(claims()))})
    assert response.status_code == 200


# A padded token: PyJWT verifies "T=" as T (test below), so each would be one more spelling of a token.
PADDED_SPELLINGS = ["Bearer {}=", "Bearer {}==", "bEaReR  {}= \t", "Bearer {}=\t"]


@pytest.mark.parametrize("spelling", ["Bearer\t{}", "Bearer{}", "Bearer {} x", "Bearer: {}", "Bearerx {}",
                                      *PADDED_SPELLINGS])
def test_other_spellings_are_refused(client, spelling):
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                           headers={"Authorization": spelling.format(hs(claims()))})
    assert response.status_code == 401


def test_a_padded_token_is_refused_although_pyjwt_verifies_it(app, client):
    """A device token has one spelling (issue 23): "T=" verified like T and hashed to another instance."""
    token = hs(claims())
    assert len(token.rsplit(".", 1)[1]) % 4 == 3  # a 32-byte HS256 signature leaves room for one "="
    # The control: PyJWT itself takes the padded token, so the refusal below is the app's own rule.
    assert auth.verify_device_token(token + "=", app.config) == ("user-1", "device-1")
    headers = {"Authorization": "Bearer %s=" % token}
    assert client.post("/wireguard/disconnect", headers=headers).status_code == 401
    assert client.post("/wireguard/disconnect", headers={"Authorization": "Bearer " + token}).status_code == 200
    # "=" inside the token is no spelling of anything: refused too.
    middle = token[:10] + "=" + token[10:]
    assert client.post("/wireguard/disconnect", headers={"Authorization": "Bearer " + middle}).status_code == 401


def test_wrong_audience_and_missing_audience(settings, monkeypatch):
    app = create_app(dict(settings, JWT_AUDIENCE="node-7"))
    app.extensions["orbmesh_helper"] = FakeHelper()
    client = app.test_client()

    def post(body):
        return client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                           headers={"Authorization": "Bearer " + hs(body)}).status_code

    assert [post(claims()), post(claims(aud="node-8")), post(claims(aud=["node-8", "node-9"])),
            post(claims(aud="node-7"))] == [401, 401, 401, 200]


# --- API keys -------------------------------------------------------------------

# (No leading/trailing-whitespace variants: HTTP parsers strip that from header values before we see them.)
@pytest.mark.parametrize("given", [API_KEYS[0].upper(), API_KEYS[0].replace("-", "_"),
                                   API_KEYS[0][:-1], API_KEYS[0] + "0", API_KEYS[0] + "," + API_KEYS[1],
                                   ",".join(API_KEYS), "\x00" + API_KEYS[0]])
def test_near_miss_api_keys_are_refused(client, given):
    response = client.get("/wireguard/status", headers={"X-API-Key": given})
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "UNAUTHORIZED"


def test_api_key_check_compares_every_key_in_constant_time(monkeypatch):
    """One compare_digest per configured key, on fixed-size digests, whether or not (or where) it matches."""
    compared = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ["key-number-%02d-0123456789" % n for n in range(5)]
    for given in (keys[0], keys[4], "nope", "", "x" * 100_000):
        compared.clear()
        assert auth.api_key_valid(given, keys) is (given in keys)
        assert compared == [(32, 32)] * len(keys), given


def test_api_key_digest_is_sha256(monkeypatch):
    digests = []
    real = hashlib.sha256
    monkeypatch.setattr(auth.hashlib, "sha256", lambda data=b"": digests.append(data) or real(data))
    auth.api_key_valid("given-key", ["configured-key-0123"])
    assert digests == [b"given-key", b"configured-key-0123"]
