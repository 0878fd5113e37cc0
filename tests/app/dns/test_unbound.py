"""app/dns/unbound.py: the Unbound config, read by unbound-checkconf (tests/need.py: skipped without it, failed
under CI)."""
import ipaddress
import subprocess

import pytest

from app.dns import unbound
from tests.need import need
from wghelper.validate import NOT_INTERNET


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
    "private and loopback upstreams": dict(upstreams=["127.0.0.1", "10.0.0.2", "fd00::53", "::1"]),
    "a routed IPv6 pool": dict(pool6="2001:db8:42::/64", gateway6="2001:db8:42::1"),
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


BLOCKED = [str(network) for network in NOT_INTERNET]


def networks(text, key):
    return [ipaddress.ip_network(value) for value in server_lines(text, key)]


def covered(nets, address):
    return any(ipaddress.ip_address(address) in net for net in nets)


def test_never_queries_nor_returns_what_a_client_may_not_reach():
    """The firewall's list, in its order: the pools here are inside it (10/8, fc00::/7), so nothing is added."""
    text = unbound.render("10.8.0.0/16", "10.8.0.1", pool6="fd00:8::/64", gateway6="fd00:8::1")
    assert server_lines(text, "do-not-query-address") == BLOCKED
    assert server_lines(text, "private-address") == BLOCKED
    # What the review found (a LAN resolver, the metadata service, unique-local, NAT64) is among them.
    assert {"10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16", "fc00::/7", "fe80::/10", "64:ff9b::/96",
            "127.0.0.0/8", "::1/128"} <= set(BLOCKED)
    # Localhost is in the list, so Unbound's own rule for it is off (one owner of the fact) ...
    assert server_lines(text, "do-not-query-localhost") == ["no"]
    # ... and with no upstream it is never queried all the same.
    assert covered(networks(text, "do-not-query-address"), "127.0.0.1")
    assert covered(networks(text, "do-not-query-address"), "::1")
    # All of it in the server clause, before the other clauses.
    server = text[:text.index("remote-control:")]
    assert server.count("do-not-query-address:") == server.count("private-address:") == len(BLOCKED)


@pytest.mark.parametrize("pool, pool6, added", [
    ("10.8.0.0/16", "2001:db8:42::/64", ["2001:db8:42::/64"]),  # a routed prefix: global, clients' addresses
    ("198.51.100.0/24", None, ["198.51.100.0/24"]),
    ("100.64.0.0/16", "fd00:8::/64", []),  # CGNAT and unique-local: already in the list
])
def test_the_pools_are_added_where_the_list_does_not_hold_them(pool, pool6, added):
    """No answer may carry another client's address (rebinding into the pool), and no query goes to one."""
    gateway = str(next(ipaddress.ip_network(pool).hosts()))
    text = unbound.render(pool, gateway, pool6=pool6, gateway6=pool6 and pool6.replace("::/64", "::1"))
    assert server_lines(text, "private-address") == BLOCKED + added
    assert server_lines(text, "do-not-query-address") == BLOCKED + added


def test_an_upstream_the_operator_names_is_the_one_exemption_and_only_itself():
    upstreams = ["127.0.0.1", "10.0.0.2", "fd00::53", "::1", "9.9.9.9"]
    text = unbound.render("10.8.0.0/16", "10.8.0.1", upstreams=upstreams, pool6="fd00:8::/64", gateway6="fd00:8::1")
    dnq = networks(text, "do-not-query-address")
    for upstream in upstreams:
        assert not covered(dnq, upstream), upstream
    for neighbour in ("127.0.0.0", "127.0.0.2", "127.255.255.255", "10.0.0.1", "10.0.0.3", "10.8.0.1", "fd00::52",
                      "fd00::54", "::", "169.254.169.254"):
        assert covered(dnq, neighbour), neighbour
    # Exactly NOT_INTERNET less the four addresses in it: every entry inside it, none overlapping another.
    assert all(any(net.version == n.version and net.subnet_of(n) for n in NOT_INTERNET) for net in dnq)
    for version in (4, 6):
        mine = [net for net in dnq if net.version == version]
        assert sum(net.num_addresses for net in ipaddress.collapse_addresses(mine)) == sum(
            net.num_addresses for net in mine)
    assert sum(net.num_addresses for net in dnq) == sum(net.num_addresses for net in NOT_INTERNET) - 4
    # Their answers are filtered like any other: the exemption is about where to ask, not what to hand on.
    assert server_lines(text, "private-address") == BLOCKED
    assert server_lines(text, "do-not-query-localhost") == ["no"]
    assert server_lines(text[text.index("forward-zone:"):], "forward-addr") == upstreams
