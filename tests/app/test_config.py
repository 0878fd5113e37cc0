"""Settings: defaults, the file and the environment, and refusing to start on a bad value or a placeholder secret."""
import pytest

from app import config as settings
from app import create_app
from tests.conftest import SECRET


@pytest.mark.parametrize("secret", ["", "changeme", "secret", "short-but-real"])
def test_refuses_to_start_with_placeholder_secret(tmp_path, secret):
    with pytest.raises(settings.ConfigError, match="JWT_SECRET"):
        create_app({"DB_PATH": str(tmp_path / "db"), "JWT_SECRET": secret, "RECONCILE_CHECK_INTERVAL": 0})


def test_refuses_short_api_key(tmp_path):
    with pytest.raises(settings.ConfigError, match="API_KEYS"):
        create_app({"DB_PATH": str(tmp_path / "db"), "JWT_SECRET": SECRET, "API_KEYS": ["short"],
                    "RECONCILE_CHECK_INTERVAL": 0})


def test_settings_from_file_and_environment(tmp_path):
    path = tmp_path / "orbmesh.env"
    path.write_text("# comment\nORBMESH_MTU=1380\nORBMESH_POOL='10.66.0.0/24'\nORBMESH_DNS=9.9.9.9\n")
    values = settings.load({"ORBMESH_CONFIG_FILE": str(path), "ORBMESH_MTU": "1280"})
    assert values["MTU"] == 1280 and values["POOL"] == "10.66.0.0/24"
    assert values["GATEWAY"] == "10.66.0.1" and values["DNS"] == ["9.9.9.9"]


@pytest.mark.parametrize("name,value", [("MTU", "100"), ("POOL", "10.8.0.1/16"), ("LISTEN_PORT", "x"),
                                        ("GATEWAY", "10.9.0.1"), ("JWT_ALGORITHM", "none"),
                                        ("DNS_RESOLVER", "yes"), ("DNS_UPSTREAM", "9.9.9.9,dns.example"),
                                        ("DNS_DNSSEC", "maybe")])
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(settings.ConfigError, match="ORBMESH_" + name):
        settings.load({"ORBMESH_" + name: value})


def test_dns_settings():
    defaults = settings.load({})
    assert (defaults["DNS"], defaults["DNS_RESOLVER"], defaults["DNS_UPSTREAM"], defaults["DNS_DNSSEC"]) == (
        None, "on", [], "on")  # DNS None: app/dns/resolver.py client_dns() derives it
    values = settings.load({"ORBMESH_DNS_UPSTREAM": " 9.9.9.9, 2620:fe::fe ", "ORBMESH_DNS_RESOLVER": "off"})
    assert values["DNS_UPSTREAM"] == ["9.9.9.9", "2620:fe::fe"] and values["DNS_RESOLVER"] == "off"
