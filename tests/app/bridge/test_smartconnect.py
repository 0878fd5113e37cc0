"""SmartConnect's policy: reading it (a bad one stops the app) and the exit it recommends."""
import pytest

from app.bridge import smartconnect
from app.config import ConfigError


def test_recommend_rules():
    rules = smartconnect.PolicySchema().load({"rules": [
        {"networks": ["198.51.100.0/24", "2001:db8::/32"], "exits": ["a", "b"]},
        {"networks": ["0.0.0.0/0"], "exits": ["c"]}]})["rules"]
    registry = type("R", (), {"get": lambda self, i: {"id": i} if i != "a" else None})()
    assert smartconnect.recommend(rules, "198.51.100.7", registry, lambda e: True)["id"] == "b"
    assert smartconnect.recommend(rules, "2001:db8::1", registry, lambda e: True)["id"] == "b"
    assert smartconnect.recommend(rules, "192.0.2.1", registry, lambda e: True)["id"] == "c"
    assert smartconnect.recommend(rules, "198.51.100.7", registry, lambda e: e["id"] != "b") is None
    assert smartconnect.recommend(rules, "::1", registry, lambda e: True) is None
    assert smartconnect.recommend(rules, "unix-socket", registry, lambda e: True) is None


@pytest.mark.parametrize("text", ['{"rules": [{"networks": ["nope"], "exits": []}]}',
                                  '{"rules": [{"networks": [], "exits": []}]}',
                                  '{"rules": [{"networks": ["0.0.0.0/0"], "exits": ["bad id!"]}]}',
                                  '{"rulez": []}', "[1, 2]", "not json"])
def test_bad_policy_stops_the_app(tmp_path, text):
    path = tmp_path / "policy.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="ORBMESH_SMARTCONNECT_POLICY"):
        smartconnect.load_policy(str(path))
