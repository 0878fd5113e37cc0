"""app/unbound.py: the Unbound config, read by unbound-checkconf (tests/need.py: skipped without it, failed under CI)."""
import subprocess

import pytest

from app import unbound
from tests.need import need


def checkconf(tmp_path, text):
    tool = need("unbound-checkconf")
    path = tmp_path / "unbound.conf"
    path.write_text(text)
    return subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=30)


def server_lines(text, key):
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith(key + ":")]


VARIANTS = {
    "recursive, validating": dict(),
    "forwarding, not validating": dict(upstreams=["9.9.9.9", "2620:fe::fe"], dnssec=False),
    "with an IPv6 gateway": dict(pool6="fd00:8::/64", gateway6="fd00:8::1", upstreams=["127.0.0.1"]),
    "started as its user": dict(username=""),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_config_passes_unbound_checkconf(tmp_path, variant):
    text = unbound.render("10.8.0.0/16", "10.8.0.1", **VARIANTS[variant])
    result = checkconf(tmp_path, text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkconf_catches_a_broken_config(tmp_path):
    """Control: the check above does read the file."""
    text = unbound.render("10.8.0.0/16", "10.8.0.1").replace("access-control: 10.8.0.0/16 allow",
                                                             "access-control: 10.8.0.0/16 bogus")
    assert checkconf(tmp_path, text).returncode != 0


def test_listens_on_the_gateways_only_and_answers_the_pools_only():
    text = unbound.render("10.8.0.0/16", "10.8.0.1", pool6="fd00:8::/64", gateway6="fd00:8::1")
    assert server_lines(text, "interface") == ["10.8.0.1", "fd00:8::1"]
    assert server_lines(text, "interface-automatic") == ["no"] and server_lines(text, "port") == ["53"]
    assert server_lines(text, "ip-freebind") == ["yes"]  # binds before the helper made the addresses
    acl = server_lines(text, "access-control")
    allowed = [rule.split()[0] for rule in acl if rule.endswith(" allow")]
    assert allowed == ["10.8.0.0/16", "fd00:8::/64"]
    refused = [rule.split()[0] for rule in acl if rule.endswith(" refuse")]
    assert {"0.0.0.0/0", "::/0", "127.0.0.0/8", "::1/128"} <= set(refused)  # localhost too: Unbound allows it by default
    assert len(acl) == len(allowed) + len(refused)
    assert server_lines(text, "control-enable") == ["no"]


def test_ipv6_needs_both_the_gateway_and_the_pool():
    text = unbound.render("10.8.0.0/16", "10.8.0.1", gateway6="fd00:8::1")
    assert server_lines(text, "interface") == ["10.8.0.1"] and "fd00" not in text


def test_upstreams_and_dnssec():
    validating = unbound.render("10.8.0.0/16", "10.8.0.1")
    assert server_lines(validating, "module-config") == ['"validator iterator"']
    assert server_lines(validating, "trust-anchor-file") == ['"/usr/share/dns/root.key"']
    assert "forward-zone:" not in validating  # recursive from the root
    forwarding = unbound.render("10.8.0.0/16", "10.8.0.1", upstreams=["9.9.9.9", "149.112.112.112"], dnssec=False)
    assert server_lines(forwarding, "module-config") == ['"iterator"'] and "trust-anchor" not in forwarding
    zone = forwarding[forwarding.index("forward-zone:"):]
    assert server_lines(zone, "name") == ['"."']
    assert server_lines(zone, "forward-addr") == ["9.9.9.9", "149.112.112.112"]


@pytest.mark.parametrize("field, value", [
    ("gateway", "10.8.0.1\n    access-control: 0.0.0.0/0 allow"),
    ("pool", "10.8.0.0/16 allow"),
    ("upstreams", ["9.9.9.9\nforward-zone:"]),
    ("gateway6", "fd00::1 allow"),
    ("username", 'unbound"\n    chroot: "/'),
])
def test_refuses_values_that_are_not_addresses(field, value):
    args = {"pool": "10.8.0.0/16", "gateway": "10.8.0.1", "pool6": "fd00::/64", "gateway6": "fd00::1"}
    args[field] = value
    with pytest.raises(ValueError):
        unbound.render(**args)


def test_from_settings_takes_ipv6_from_the_helper_hello():
    values = {"POOL": "10.66.0.0/16", "GATEWAY": "10.66.0.1", "DNS_UPSTREAM": ["192.0.2.53"], "DNS_DNSSEC": "off"}
    plain = unbound.from_settings(values, {"public_key": "k"})  # a hello without IPv6 keys: no IPv6
    assert server_lines(plain, "interface") == ["10.66.0.1"]
    assert server_lines(plain, "forward-addr") == ["192.0.2.53"] and '"iterator"' in plain
    dual = unbound.from_settings(values, {"pool6": "fd00:66::/64", "gateway6": "fd00:66::1"})
    assert server_lines(dual, "interface") == ["10.66.0.1", "fd00:66::1"]
    assert unbound.from_settings(values, {"pool6": None, "gateway6": None}) == plain
