"""GET /wireguard/usage and POST /wireguard/limits: the API key, bad input, paging, the document."""
import pytest

from app.peers import usage
from app.peers.db import connect as db_connect
from app.peers.db import write
from tests.conftest import make_key

SCOPED = "scoped-key-for-u-0123456789"


@pytest.fixture
def settings(settings):
    return dict(settings, SCOPED_API_KEYS=[SCOPED + "=u"])


def get(client, internal, query=""):
    return client.get("/wireguard/usage" + query, headers=internal)


def test_an_unknown_user_has_usage_zero(client, internal):
    response = get(client, internal, "?userUuid=nobody")
    assert response.status_code == 200
    assert response.get_json() == {
        "success": True, "userUuid": "nobody", "period": 0, "periodStart": None, "rateMbps": None, "quotaBytes": None,
        "limitsFrom": {"rateMbps": None, "quotaBytes": None}, "state": "active",
        "total": {"bytesUp": 0, "bytesDown": 0, "bytes": 0}, "devices": []}


def test_limits_answers_the_usage_and_a_connected_device_is_listed(client, internal, auth):
    client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth("u", "d1"))
    body = client.post("/wireguard/limits", headers=internal, json={
        "userUuid": "u", "rateMbps": 20, "quotaBytes": 50_000_000_000}).get_json()
    assert body["success"] and body["rateMbps"] == 20 and body["quotaBytes"] == 50_000_000_000
    assert body["limitsFrom"] == {"rateMbps": "api", "quotaBytes": "api"}
    assert body["devices"] == [{"deviceId": "d1", "source": "client", "publicKey": make_key(1), "bytesUp": 0,
                                "bytesDown": 0, "bytes": 0, "lastHandshake": None, "transport": None,
                                "connected": True, "state": "active"}]
    assert get(client, internal, "?userUuid=u").get_json() == body


@pytest.mark.parametrize("body, field", [
    ({}, "userUuid"),
    ({"userUuid": "u 1"}, "userUuid"),
    ({"userUuid": "u", "rateMbps": 0}, "rateMbps"),          # below 1 Mbit/s
    ({"userUuid": "u", "rateMbps": 100_001}, "rateMbps"),    # above 100 Gbit/s
    ({"userUuid": "u", "rateMbps": -20}, "rateMbps"),
    ({"userUuid": "u", "rateMbps": 20.5}, "rateMbps"),
    ({"userUuid": "u", "rateMbps": "20"}, "rateMbps"),
    ({"userUuid": "u", "rateMbps": True}, "rateMbps"),
    ({"userUuid": "u", "quotaBytes": -1}, "quotaBytes"),
    ({"userUuid": "u", "quotaBytes": 10 ** 15 + 1}, "quotaBytes"),
    ({"userUuid": "u", "quotaBytes": 1e20}, "quotaBytes"),
    ({"userUuid": "u", "quotaBytes": 2 ** 64}, "quotaBytes"),
    ({"userUuid": "u", "resetUsage": "yes"}, "resetUsage"),
    ({"userUuid": "u", "plan": "gold"}, "plan"),
])
def test_bad_limits_are_400_naming_the_field_and_change_nothing(client, internal, fake_helper, snapshot, app, body,
                                                               field):
    before = snapshot()
    response = client.post("/wireguard/limits", headers=internal, json=body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and field in error["details"]["fields"]
    assert snapshot() == before and not [c for c in fake_helper.calls if c[0] == "limits"]
    db = db_connect(app.config["DB_PATH"])
    try:
        assert db.execute("SELECT count(*) FROM usage_users").fetchone()[0] == 0
    finally:
        db.close()


@pytest.mark.parametrize("query, field", [
    ("?userUuid=a%20b", "userUuid"), ("?userUuid=" + "a" * 129, "userUuid"), ("?limit=0", "limit"),
    ("?limit=1001", "limit"), ("?limit=-1", "limit"), ("?limit=x", "limit"), ("?cursor=", "cursor"),
    ("?cursor=!!", "cursor"), ("?userUuid=u&cursor=dQ", "userUuid"), ("?userUuid=u&userUuid=v", "userUuid"),
    ("?user=u", "user")])
def test_bad_usage_queries_are_400_naming_the_field(client, internal, query, field):
    response = get(client, internal, query)
    assert response.status_code == 400, response.get_json()
    assert field in response.get_json()["error"]["details"]["fields"]


def test_keys(client, auth):
    for path, method in (("/wireguard/usage?userUuid=u", "get"), ("/wireguard/limits", "post")):
        call = getattr(client, method)
        assert call(path, json={"userUuid": "u"}).status_code == 401
        assert call(path, json={"userUuid": "u"}, headers={"X-API-Key": "wrong-key-0123456789"}).status_code == 401
        assert call(path, json={"userUuid": "u"}, headers={"X-API-Key": SCOPED}).status_code == 403
        assert call(path, json={"userUuid": "u"}, headers=auth()).status_code == 401  # a device token is not a key


def test_every_user_a_page_at_a_time(app, client, internal):
    db = db_connect(app.config["DB_PATH"])
    try:
        with write(db):
            for i in range(2345):
                usage._ensure(db, "user-%05d" % i)
    finally:
        db.close()
    seen, cursor, pages = [], None, 0
    while True:
        body = get(client, internal, "?cursor=%s" % cursor if cursor else "").get_json()
        pages += 1
        assert len(body["users"]) <= 1000
        seen += [u["userUuid"] for u in body["users"]]
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == ["user-%05d" % i for i in range(2345)]
    small = get(client, internal, "?limit=2").get_json()
    assert [u["userUuid"] for u in small["users"]] == ["user-00000", "user-00001"]
    assert get(client, internal, "?limit=2&cursor=" + small["nextCursor"]).get_json()["users"][0]["userUuid"] == \
        "user-00002"


def test_a_helper_failure_undoes_the_limits(client, internal, auth, fake_helper, snapshot):
    client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth("u", "d1"))
    client.post("/wireguard/limits", headers=internal, json={"userUuid": "u", "rateMbps": 5})
    before = client.get("/wireguard/usage?userUuid=u", headers=internal).get_json()
    fake_helper.fail = "unavailable"
    response = client.post("/wireguard/limits", headers=internal, json={"userUuid": "u", "rateMbps": 50,
                                                                         "quotaBytes": 7, "resetUsage": True})
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "HELPER_UNAVAILABLE"
    fake_helper.fail = None
    assert client.get("/wireguard/usage?userUuid=u", headers=internal).get_json() == before
    assert fake_helper.limited["u"]["rate_mbps"] == 5


def test_the_document_has_both_operations(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["paths"]["/wireguard/limits"]["post"]["security"] == [{"apiKey": []}]
    assert {"200", "400", "401", "403", "502", "503"} <= set(doc["paths"]["/wireguard/limits"]["post"]["responses"])
    assert doc["components"]["schemas"]["Limits"]["properties"]["rateMbps"]["maximum"] == 100000
    names = {p["name"] for p in doc["paths"]["/wireguard/usage"]["get"]["parameters"]}
    assert names == {"userUuid", "cursor", "limit"}
    assert "QUOTA_EXCEEDED" in doc["paths"]["/wireguard/connect"]["post"]["responses"]["403"]["description"]
