import ipaddress
import subprocess
import sys

import pytest

from app import config as app_config
from wghelper import settings
from wghelper.settings import ConfigError, load, read_env_file


def test_defaults():
    s = load({})
    assert s.interface == "wg0" and s.listen_port == 51820 and s.mtu == 1420
    assert s.pool == ipaddress.ip_network("10.8.0.0/16")
    assert s.gateway == ipaddress.ip_address("10.8.0.1")
    assert s.helper_socket == "/run/orbmesh/wghelper.sock" and s.helper_socket_group is None
    assert s.helper_allowed_uids == frozenset({0})
    assert s.helper_state_dir == "/var/lib/orbmesh-wghelper"
    assert (s.wg_backend, s.wireguard_go) == ("auto", "wireguard-go")
    assert (s.helper_command_timeout, s.helper_watch_interval, s.helper_max_connections) == (10.0, 1.0, 256)


def test_read_env_file(tmp_path):
    path = tmp_path / "orbmesh.env"
    path.write_text(
        "# a comment\n"
        "\n"
        "ORBMESH_INTERFACE=wg7\n"
        "ORBMESH_POOL = '10.9.0.0/24'\n"
        'ORBMESH_MTU="1280"\n'
        "export ORBMESH_LISTEN_PORT=4000\n"
        "ORBMESH_GATEWAY=\n"
        "  ; another comment\n")
    assert read_env_file(path) == {"ORBMESH_INTERFACE": "wg7", "ORBMESH_POOL": "10.9.0.0/24",
                                   "ORBMESH_MTU": "1280", "ORBMESH_LISTEN_PORT": "4000",
                                   "ORBMESH_GATEWAY": ""}


def test_read_env_file_refuses_garbage(tmp_path):
    path = tmp_path / "bad.env"
    path.write_text("ORBMESH_MTU=1280\nthis is not a setting\n")
    with pytest.raises(ValueError, match=":2:"):
        read_env_file(path)


def test_file_then_environment(tmp_path):
    path = tmp_path / "orbmesh.env"
    path.write_text("ORBMESH_INTERFACE=wgfile\nORBMESH_MTU=1300\nORBMESH_POOL=10.9.0.0/24\n")
    s = load({"ORBMESH_CONFIG_FILE": str(path), "ORBMESH_MTU": "1400", "ORBMESH_INTERFACE": ""})
    assert s.mtu == 1400                 # the environment wins
    assert s.interface == "wg0"          # empty means default, as in systemd files
    assert str(s.gateway) == "10.9.0.1"  # derived from the file's pool


def test_bridge_networks():
    assert load({}).bridge_networks == ()  # bridge mode off
    assert [str(n) for n in load({"ORBMESH_BRIDGE_NETWORKS": " 10.9.0.0/16, 100.64.0.0/10,"}).bridge_networks] == [
        "10.9.0.0/16", "100.64.0.0/10"]


def test_names_and_ids():
    s = load({"ORBMESH_HELPER_ALLOWED_UIDS": "0, root,65534", "ORBMESH_HELPER_SOCKET_GROUP": "root"})
    assert s.helper_allowed_uids == frozenset({0, 65534}) and s.helper_socket_group == 0
    assert load({"ORBMESH_HELPER_SOCKET_GROUP": "1234"}).helper_socket_group == 1234


@pytest.mark.parametrize("name, value", [
    ("INTERFACE", "wg 0"), ("INTERFACE", "a" * 16), ("INTERFACE", "wg0;rm"), ("INTERFACE", "wg\n0"),
    ("LISTEN_PORT", "0"), ("LISTEN_PORT", "65536"), ("LISTEN_PORT", "x"),
    ("POOL", "10.8.0.1/16"), ("POOL", "10.8.0.0/31"), ("POOL", "nope"),
    ("GATEWAY", "10.9.0.1"), ("GATEWAY", "10.8.0.0"), ("GATEWAY", "10.8.255.255"), ("GATEWAY", "x"),
    ("MTU", "575"), ("MTU", "9001"),
    ("HELPER_SOCKET", "relative.sock"), ("HELPER_STATE_DIR", "state"),
    ("HELPER_SOCKET_GROUP", "no-such-group-xyz"), ("HELPER_ALLOWED_UIDS", "no-such-user-xyz"),
    ("HELPER_ALLOWED_UIDS", ","), ("WG_BACKEND", "magic"),
    ("HELPER_COMMAND_TIMEOUT", "0"), ("HELPER_COMMAND_TIMEOUT", "nan"), ("HELPER_WATCH_INTERVAL", "-1"),
    ("HELPER_MAX_CONNECTIONS", "0"),
    ("BRIDGE_NETWORKS", "10.9.0.1/16"), ("BRIDGE_NETWORKS", "fd00::/64"), ("BRIDGE_NETWORKS", "10.9.0.0/16;x"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        load({"ORBMESH_" + name: value})
    assert str(info.value).startswith("ORBMESH_%s: " % name)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="ORBMESH_CONFIG_FILE"):
        load({"ORBMESH_CONFIG_FILE": "/nonexistent/orbmesh.env"})


def test_cli_config_error_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "bad.env"
    config.write_text("ORBMESH_MTU=5\n")
    done = subprocess.run([sys.executable, "-m", "wghelper", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["orbmesh-wghelper: ORBMESH_MTU: must be between 576 and 9000"]


def test_app_and_helper_read_the_shared_settings_alike(tmp_path):
    """One table, one parser: both processes get the same values, and refuse the same."""
    env = {"ORBMESH_INTERFACE": "wg7", "ORBMESH_POOL": "10.9.0.0/24", "ORBMESH_LISTEN_PORT": "4000",
           "ORBMESH_MTU": "1280", "ORBMESH_HELPER_SOCKET": "/run/x/helper.sock", "ORBMESH_JWT_SECRET": "s" * 40}
    helper, app = load(env), app_config.load(env)
    for name in settings.SHARED:
        assert str(helper[name]) == str(app[name]), name
    for bad in ({"ORBMESH_POOL": "fd00:8::/64"}, {"ORBMESH_INTERFACE": "wg 0"}, {"ORBMESH_HELPER_SOCKET": "x.sock"},
                {"ORBMESH_GATEWAY": "10.10.0.1"}):
        errors = []
        for loader in (load, app_config.load):
            with pytest.raises(ConfigError) as info:
                loader(dict(env, **bad))
            errors.append(str(info.value))
        assert errors[0] == errors[1] and errors[0].startswith(next(iter(bad)) + ": ")


def test_every_shared_setting_is_in_the_app_table():
    assert set(settings.SHARED) <= set(app_config.SETTINGS)
    assert not set(settings.HELPER) & set(app_config.SETTINGS)


# --- ORBMESH_POOL6 (shared: the app reads it too) ---------------------------------

def test_pool6_default_is_the_nodes_own_ula_made_by_the_helper():
    s = load({})
    assert (s.pool6, s.gateway6) == (settings.AUTO, None)  # made from the state directory at start
    s["POOL6"] = ipaddress.ip_network("fd12:3456:789a::/64")  # as wghelper/__main__.py does
    assert s.gateway6 == ipaddress.ip_address("fd12:3456:789a::1")
    assert load({"ORBMESH_POOL6": ""}).pool6 == load({"ORBMESH_POOL6": "auto"}).pool6 == settings.AUTO


def test_pool6_off_and_routed():
    off = load({"ORBMESH_POOL6": "off"})
    assert (off.pool6, off.gateway6) == (None, None)
    routed = load({"ORBMESH_POOL": "10.9.0.0/24", "ORBMESH_GATEWAY": "10.9.0.200", "ORBMESH_POOL6": "2001:db8:9::/120"})
    # The gateway's offset in the IPv4 pool (200) in pool6.
    assert (str(routed.pool6), str(routed.gateway6)) == ("2001:db8:9::/120", "2001:db8:9::c8")


def test_offsets_map_every_ipv4_address_into_pool6():
    pool, pool6 = ipaddress.ip_network("10.8.0.0/16"), ipaddress.ip_network("fd00:8::/64")
    assert [str(settings.address6(pool, pool6, ipaddress.ip_address(a))) for a in
            ("10.8.0.2", "10.8.1.0", "10.8.255.254")] == ["fd00:8::2", "fd00:8::100", "fd00:8::fffe"]
    assert str(settings.address6(pool, pool6, int(ipaddress.ip_address("10.8.0.42")))) == "fd00:8::2a"


@pytest.mark.parametrize("pool, pool6, ok", [
    ("10.8.0.0/16", "fd00:8::/112", True),    # exactly the room needed
    ("10.8.0.0/16", "fd00:8::/113", False),   # half of it
    ("10.9.0.0/24", "2001:db8::/120", True),
    ("10.9.0.0/24", "2001:db8::/121", False),
    ("10.9.0.0/24", "2001:db8::/64", True),
])
def test_a_pool6_too_small_for_the_pool_is_refused(pool, pool6, ok):
    env = {"ORBMESH_POOL": pool, "ORBMESH_POOL6": pool6, "ORBMESH_JWT_SECRET": "s" * 40}
    for loader in (load, app_config.load):  # both processes refuse it at start
        if ok:
            assert str(loader(env)["POOL6"]) == pool6
        else:
            with pytest.raises(ConfigError, match="^ORBMESH_POOL6: must be a /%d or larger"
                               % (96 + int(pool.split("/")[1]))):
                loader(env)


@pytest.mark.parametrize("value", ["10.8.0.0/16", "fd00:8::1/64", "nope", "OFF", "on"])
def test_bad_pool6_names_the_variable(value):
    with pytest.raises(ConfigError, match="^ORBMESH_POOL6: "):
        load({"ORBMESH_POOL6": value})


def test_dns_resolver_setting():
    assert load({}).dns_resolver == "on" and load({"ORBMESH_DNS_RESOLVER": "off"}).dns_resolver == "off"
    with pytest.raises(ConfigError, match="^ORBMESH_DNS_RESOLVER: "):
        load({"ORBMESH_DNS_RESOLVER": "maybe"})
