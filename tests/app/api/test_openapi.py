"""GET /openapi.json: every route documented, in the JSON Schema dialect."""
import pytest


@pytest.fixture
def settings(settings):
    # Not the default, so the document is seen to follow the setting.
    return dict(settings, TUNNEL_HOLD=0.05)


def test_openapi_covers_every_route(client, app):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes == set(doc["paths"])
    connect = doc["paths"]["/wireguard/connect"]["post"]
    assert {"200", "400", "401", "409", "413", "500", "502", "503"} <= set(connect["responses"])
    assert doc["components"]["schemas"]["Connect"]["required"] == ["publicKey"]
    assert "publicKey" in doc["components"]["schemas"]["AddPeer"]["properties"]


def test_document_patterns_use_the_json_schema_dialect(client, app):
    """No Python-only anchors (\\A, \\Z): JSON Schema reads them as the letters A and Z."""
    doc = client.get("/openapi.json").get_json()
    patterns = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                patterns.append(node["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert len(patterns) >= 4
    assert [p for p in patterns if "\\A" in p or "\\Z" in p or not (p.startswith("^") and p.endswith("$"))] == []
    wait = [p for p in doc["paths"]["/wireguard/tunnel"]["post"]["parameters"] if p["name"] == "X-Tunnel-Wait"][0]
    assert wait["schema"]["maximum"] == app.config["TUNNEL_HOLD"] == 0.05


def test_document_shows_the_ipv6_fields(client):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    connect = schemas["ConnectResponse"]
    for name in ("ip6", "gateway6"):
        assert connect["properties"][name]["type"] == "string" and connect["properties"][name]["nullable"] is True
        assert name in connect["required"]
    assert "ip" in connect["required"] and connect["properties"]["ip"]["example"] == "10.8.0.42/32"
    assert schemas["StatusResponse"]["properties"]["gateway6"]["nullable"] is True
    assert "gateway6" in schemas["WireguardHealth"]["properties"]
    assert "/128" in schemas["AddPeer"]["properties"]["allowedIPs"]["description"]
