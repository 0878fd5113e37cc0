"""The helper's nftables table and forwarding (wghelper/firewall.py): the exact ruleset and argv."""
import ipaddress
import json
import logging
import os

import pytest

from tests.need import need
from wghelper import firewall, limits
from wghelper.argv import Commands, Runner
from wghelper.errors import CommandFailed, ConfigError
from wghelper.firewall import Firewall
from wghelper.interface import Interface
from wghelper.settings import load

from .fakes import FAKE_IF, FAKE_KEYFILE, FakeRunner, settings

IF = FAKE_IF
UP = "up0"
K_WG = "net/ipv4/conf/%s/forwarding" % IF
K_UP = "net/ipv4/conf/%s/forwarding" % UP
K6_WG = "net/ipv6/conf/%s/forwarding" % IF

K_ALL = "net/ipv4/conf/all/forwarding"
K_DEFAULT = "net/ipv4/conf/default/forwarding"
K6_ALL = "net/ipv6/conf/all/forwarding"

# validate.NOT_INTERNET, as nft lists it (:: and ::1 merged into ::/127; IPv4-mapped in dotted form).
BLOCKED4 = ("ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, "
            "192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3 } drop")
BLOCKED6 = ("ip6 daddr { ::/127, ::ffff:0.0.0.0/96, 64:ff9b::/96, 64:ff9b:1::/48, 100::/64, 2002::/16, fc00::/7, "
            "fe80::/10, ff00::/8 } drop")

TABLE_V4 = """\
table inet orbmesh {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "up0" ip saddr 10.8.0.0/16 masquerade
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "wgt0" jump to_node
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "wgt0" jump from_clients
\t\toifname "wgt0" ct state established,related accept
\t\toifname "wgt0" drop
\t}

\tchain to_node {
\t\tct state established,related accept
\t\tip daddr 10.8.0.1 icmp type echo-request accept
\t\tip daddr 10.8.0.1 meta l4proto { tcp, udp } th dport 53 accept
\t\ttcp dport 8443 accept
\t\tdrop
\t}

\tchain from_clients {
\t\t%s
\t\toifname "up0" ip saddr 10.8.0.0/16 accept
\t\tdrop
\t}
}
""" % BLOCKED4
SCRIPT_V4 = "table inet orbmesh {}\ndelete table inet orbmesh\n" + TABLE_V4

SCRIPT_V6 = """\
table inet omtest {}
delete table inet omtest
table inet omtest {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "eth0.100" ip saddr 10.9.0.0/24 masquerade
\t\toifname "eth0.100" ip6 saddr fd00:8::/64 masquerade
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "wgt0" jump to_node
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "wgt0" jump from_clients
\t\toifname "wgt0" ct state established,related accept
\t\toifname "wgt0" drop
\t}

\tchain to_node {
\t\tct state established,related accept
\t\tip daddr 10.9.0.1 icmp type echo-request accept
\t\tip daddr 10.9.0.1 meta l4proto { tcp, udp } th dport 53 accept
\t\tip6 daddr fd00:8::1 icmpv6 type echo-request accept
\t\tip6 daddr fd00:8::1 meta l4proto { tcp, udp } th dport 53 accept
\t\ttcp dport 8443 accept
\t\tdrop
\t}

\tchain from_clients {
\t\t%s
\t\toifname "eth0.100" ip saddr 10.9.0.0/24 accept
\t\t%s
\t\toifname "eth0.100" ip6 saddr fd00:8::/64 accept
\t\tdrop
\t}
}
""" % (BLOCKED4, BLOCKED6)

APPLY_CALLS = [
    ["ip", "-o", "address", "show"], ["nft", "-f", "-"],
    ["sysctl", "-n", K_WG], ["sysctl", "-w", K_WG + "=1"],
    ["sysctl", "-n", K_UP], ["sysctl", "-w", K_UP + "=1"],
]


TABLE_BRIDGES_ONLY = """\
table inet orbmesh {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "wgt0b0" ip saddr 10.8.0.0/16 masquerade
\t\toifname "wgt0b3" ip saddr 10.8.0.0/16 masquerade
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "wgt0" jump to_node
\t\tiifname "wgt0b0" ct state established,related accept
\t\tiifname "wgt0b0" drop
\t\tiifname "wgt0b3" ct state established,related accept
\t\tiifname "wgt0b3" drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "wgt0" jump from_clients
\t\tiifname "wgt0b0" oifname "wgt0" ct state established,related accept
\t\tiifname "wgt0b0" drop
\t\tiifname "wgt0b3" oifname "wgt0" ct state established,related accept
\t\tiifname "wgt0b3" drop
\t\toifname "wgt0" ct state established,related accept
\t\toifname "wgt0" drop
\t}

\tchain to_node {
\t\tct state established,related accept
\t\tip daddr 10.8.0.1 icmp type echo-request accept
\t\tip daddr 10.8.0.1 meta l4proto { tcp, udp } th dport 53 accept
\t\ttcp dport 8443 accept
\t\tdrop
\t}

\tchain from_clients {
\t\t%s
\t\toifname "wgt0b0" ip saddr 10.8.0.0/16 accept
\t\toifname "wgt0b3" ip saddr 10.8.0.0/16 accept
\t\tdrop
\t}
}
""" % BLOCKED4

# `ip -o address show` of a host with an uplink in a public /26, a private
# LAN, a point-to-point link, IPv6 on the uplink, a network of a hosting
# provider (public, v4 and v6) and one of IPv6's benchmarking range (not
# global, yet in none of NOT_INTERNET) (trailing fields cut).
ADDRESSES = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host noprefixroute \\       valid_lft forever preferred_lft forever
2: up0    inet 203.0.113.1/26 brd 203.0.113.63 scope global up0\\       valid_lft forever preferred_lft forever
2: up0    inet6 2001:db8:1::5/64 scope global \\       valid_lft forever preferred_lft forever
2: up0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever
3: lan0    inet 192.168.7.1/24 brd 192.168.7.255 scope global lan0\\       valid_lft forever
4: wgt0    inet 10.8.0.1/16 scope global wgt0\\       valid_lft forever preferred_lft forever
5: p2p0    inet 198.51.100.7 peer 198.51.100.9/32 scope global p2p0\\       valid_lft forever
6: pub0    inet 5.6.7.8/20 brd 5.6.15.255 scope global pub0\\       valid_lft forever
6: pub0    inet6 2a01:4f8:1::8/64 scope global \\       valid_lft forever
7: bench0    inet6 2001:2::1/48 scope global \\       valid_lft forever
"""

# Everything opened that can be, with those networks and a bridge link.
FROM_CLIENTS_OPENED = """\
\tchain to_node {
\t\tct state established,related accept
\t\tip daddr 10.8.0.1 icmp type echo-request accept
\t\tip6 daddr fd00:8::1 icmpv6 type echo-request accept
\t\ttcp dport { 22, 443, 8443 } accept
\t\tdrop
\t}

\tchain from_clients {
\t\tip daddr { 10.20.1.0-10.20.2.255, 192.168.7.5 } accept
\t\toifname "wgt0" ip daddr 10.8.0.0/16 accept
\t\t%s
\t\toifname "up0" ip saddr 10.8.0.0/16 accept
\t\toifname "wgt0b1" ip saddr 10.8.0.0/16 accept
\t\tip6 daddr fd00:99::/64 accept
\t\toifname "wgt0" ip6 daddr fd00:8::/64 accept
\t\tip6 daddr { ::/127, ::ffff:0.0.0.0/96, 64:ff9b::/96, 64:ff9b:1::/48, 100::/64, 2001:2::/48, 2002::/16, \
fc00::/7, fe80::/10, ff00::/8 } drop
\t\toifname "up0" ip6 saddr fd00:8::/64 accept
\t\tdrop
\t}
}
""" % BLOCKED4


def make(tmp_path=None, state=True, **overrides):
    runner = FakeRunner()
    runner.sysctls.update({K_WG: "0", K_UP: "0", K6_WG: "0", K_ALL: "0", K_DEFAULT: "0", K6_ALL: "0"})
    cfg = settings(**dict({"nat_uplink": UP}, **overrides))
    path = str(tmp_path / firewall.STATE_FILE) if (tmp_path is not None and state) else None
    return Firewall(cfg, Commands(runner), path), runner


def up(n):
    """As __main__ starts: the table, (the interface,) then forwarding."""
    n.start()
    n.forward()


# --- the ruleset text ---------------------------------------------------------

def test_exact_ruleset_ipv4():
    cfg = settings(nat_uplink=UP)
    assert firewall.render(cfg) == TABLE_V4
    assert firewall.script(cfg) == SCRIPT_V4


def test_exact_ruleset_with_pool6():
    cfg = settings(nat_uplink="eth0.100", nat_table="omtest", pool="10.9.0.0/24", pool6="fd00:8::/64")
    assert firewall.script(cfg) == SCRIPT_V6
    # IPv6 forwarding only on the WireGuard side (see forwarding_keys), '/' keys for dotted names.
    assert firewall.forwarding_keys(cfg) == [K_WG, "net/ipv4/conf/eth0.100/forwarding", K6_WG]


def test_a_routed_pool6_is_forwarded_but_not_masqueraded():
    cfg = settings(nat_uplink="eth0.100", nat_table="omtest", pool="10.9.0.0/24", pool6="2001:db8:8::/64")
    routed = SCRIPT_V6.replace("fd00:8::", "2001:db8:8::")
    assert firewall.script(cfg) == routed.replace('\t\toifname "eth0.100" ip6 saddr 2001:db8:8::/64 masquerade\n', "")
    assert firewall.script(cfg) != routed  # the control: the line removed above was there
    assert firewall.forwarding_keys(cfg)[-1] == K6_WG
    assert "masquerade" in firewall.render(settings(nat_uplink=UP, pool6="fc00:1::/64"))  # all of fc00::/7 is ULA


def test_bridge_links_share_the_one_table():
    assert firewall.render(settings(), ["wgt0b0", "wgt0b3"]) == TABLE_BRIDGES_ONLY
    with_uplink = firewall.render(settings(nat_uplink=UP), ["wgt0b3"])
    assert with_uplink.count("masquerade") == 2 and with_uplink.count('"wgt0b3" drop') == 2


def test_everything_opened_with_the_host_networks_and_a_bridge():
    cfg = settings(nat_uplink=UP, pool6="fd00:8::/64", dns_resolver="off", client_to_client="on",
                   allowed_destinations="10.20.2.0/24, 192.168.7.5/32 fd00:99::/64,10.20.1.0/24",
                   client_node_ports="443,22,443", client_api_port="8443")
    table = firewall.render(cfg, ["wgt0b1"], firewall.connected(ADDRESSES))
    assert table.endswith(FROM_CLIENTS_OPENED)
    # Per family, in the order the chain is read: allowed, other clients, the blocked ranges, the way out.
    assert "meta l4proto" not in table  # no resolver, no DNS port


def test_only_connected_networks_that_are_not_the_internet_are_blocked():
    table = firewall.render(settings(nat_uplink=UP, pool6="fd00:8::/64"), (), firewall.connected(ADDRESSES))
    drops = [line for line in table.splitlines() if line.endswith("} drop")]
    # The private LAN and the benchmarking range: blocked (the LAN inside 192.168/16, listed once) ...
    assert "192.168.0.0/16" in drops[0] and "192.168.7.0/24" not in drops[0] and "2001:2::/48" in drops[1]
    # ... the public networks of the host, its hosting provider's and the documentation ones (the
    # tests' internet), not: their other hosts are the internet.
    for public in ("5.6.0.0/20", "2a01:4f8:1::/64", "203.0.113.0/26", "198.51.100.9", "2001:db8:1::/64"):
        assert public not in table, public
    # Control: without the host's networks the benchmarking range is not there either.
    assert "2001:2::" not in firewall.render(settings(nat_uplink=UP, pool6="fd00:8::/64"))


@pytest.mark.parametrize("range_", ["64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "::ffff:0.0.0.0/96", "::/127",
                                    "100::/64", "192.0.0.0/24", "198.18.0.0/15"])
def test_the_ranges_that_were_missing_are_blocked(range_):
    """NAT64 (reaches private IPv4 behind a provider's NAT64), 6to4, IPv4-mapped, unspecified (with ::1),
    discard-only, IETF protocol assignments, benchmarking."""
    table = firewall.render(settings(nat_uplink=UP, pool6="fd00:8::/64"))
    assert any(range_ in line and line.endswith("} drop") for line in table.splitlines())


def test_the_api_port_is_open_by_default_and_can_be_closed_or_moved():
    assert "\t\ttcp dport 8443 accept\n" in firewall.render(settings(nat_uplink=UP))
    assert "tcp dport" not in firewall.render(settings(nat_uplink=UP, client_api_port="off"))
    assert "\t\ttcp dport 8080 accept\n" in firewall.render(settings(nat_uplink=UP, client_api_port="8080"))
    assert "\t\ttcp dport { 22, 8080 } accept\n" in firewall.render(
        settings(nat_uplink=UP, client_api_port="8080", client_node_ports="22"))


def test_without_uplink_clients_leave_by_any_interface_of_a_family_the_host_routes():
    """A routed IPv6 prefix on a host that forwards IPv6 itself: isolated, and out by its own routes."""
    cfg = settings(pool6="2001:db8:8::/64")
    none, v6, both = (firewall.render(cfg, (), (), routed) for routed in ((), (6,), (4, 6)))
    assert 'oifname != "wgt0"' not in none  # control: no way out at all
    assert v6.count('oifname != "wgt0"') == 1 and 'oifname != "wgt0" ip6 saddr 2001:db8:8::/64 accept' in v6
    assert 'oifname != "wgt0" ip saddr 10.8.0.0/16 accept' in both
    # The way out comes after the drops, and nothing new reaches the clients from outside.
    assert v6.index(BLOCKED6) < v6.index('oifname != "wgt0"')
    assert '\t\toifname "wgt0" ct state established,related accept\n\t\toifname "wgt0" drop\n' in v6
    # An uplink decides alone where clients leave.
    assert 'oifname != ' not in firewall.render(settings(nat_uplink=UP, pool6="2001:db8:8::/64"), (), (), (4, 6))


def test_connected_networks_of_ip_address_show():
    assert [str(n) for n in firewall.connected(ADDRESSES)] == [
        "127.0.0.0/8", "::1/128", "203.0.113.0/26", "2001:db8:1::/64", "fe80::/64", "192.168.7.0/24",
        "10.8.0.0/16", "198.51.100.9/32", "5.6.0.0/20", "2a01:4f8:1::/64", "2001:2::/48"]
    assert firewall.connected("") == []


@pytest.mark.parametrize("nets, listed", [
    (["10.1.1.0/24", "10.1.2.0/24"], "10.1.1.0-10.1.2.255"),   # adjacent, not one prefix: a range
    (["10.1.0.0/24", "10.1.1.0/24"], "10.1.0.0/23"),           # adjacent and aligned: one prefix
    (["10.0.0.0/8", "10.8.0.0/16"], "10.0.0.0/8"),             # inside another
    (["192.0.2.7/32", "10.0.0.0/8"], "{ 10.0.0.0/8, 192.0.2.7 }"),
    (["fd00::1/128", "fc00::/8"], "{ fc00::/8, fd00::1 }"),
    (["::/128", "::1/128"], "::/127"),                         # adjacent and aligned
    (["::ffff:0:0/96"], "::ffff:0.0.0.0/96"),                  # IPv4 inside: dotted, as inet_ntop prints it
    (["::ffff:10.0.0.5/128"], "::ffff:10.0.0.5"),
    (["::10.0.0.0/104"], "::10.0.0.0/104"),                    # IPv4-compatible
    (["::/126"], "::/126"),                                    # :: and ::1 to ::3: no IPv4 inside
])
def test_sets_are_written_as_nft_lists_them(nets, listed):
    assert firewall._nets([ipaddress.ip_network(n) for n in nets]) == listed


def test_apply_blocks_the_host_networks_it_reads(tmp_path):
    n, runner = make(tmp_path, pool6="fd00:8::/64")
    runner.address_text = ADDRESSES
    n.start()
    assert runner.calls == [["ip", "-o", "address", "show"], ["nft", "-f", "-"]]  # an uplink: nothing to decide
    applied = runner.stdins[0][1]
    assert applied == firewall.script(n.s, (), firewall.connected(ADDRESSES))
    assert "100::/64, 2001:2::/48, 2002::/16" in applied and "5.6.0.0" not in applied


def test_without_uplink_or_bridges_there_is_no_table_unless_the_host_forwards(tmp_path):
    n, runner = make(tmp_path, nat_uplink="")
    n.start()
    # The local run: nothing forwards, so a leftover table goes and none is written.
    assert runner.calls == [["sysctl", "-n", K_ALL], ["ip", "-o", "link", "show", "dev", IF],
                            ["sysctl", "-n", K_DEFAULT], ["nft", "delete", "table", "inet", "orbmesh"]]
    assert runner.nft_tables == {} and not any(c[:2] == ["sysctl", "-w"] for c in runner.calls)
    runner.clear()
    n.apply(["wgt0b1"])  # a bridge: the table
    n.apply([])          # none left, and the interface does not exist (yet): no table
    assert runner.calls == [["sysctl", "-n", K_ALL], ["ip", "-o", "address", "show"], ["nft", "-f", "-"],
                            ["sysctl", "-n", K_ALL], ["ip", "-o", "link", "show", "dev", IF],
                            ["sysctl", "-n", K_DEFAULT], ["nft", "delete", "table", "inet", "orbmesh"]]
    assert runner.nft_tables == {}


@pytest.mark.parametrize("forwarding, routed", [
    ({K_DEFAULT: "1"}, ()),            # the interface will forward IPv4 when it is made
    ({K_WG: "1"}, ()),                 # the link exists and forwards IPv4 (an earlier helper's bridge, say)
    ({K_ALL: "1", K_DEFAULT: "1"}, (4,)),  # the host routes IPv4 itself (ip_forward=1)
    ({K6_ALL: "1"}, (6,)),             # the host routes IPv6, and clients have IPv6 (a routed prefix)
])
def test_without_uplink_a_host_that_forwards_gets_the_table(tmp_path, forwarding, routed):
    n, runner = make(tmp_path, nat_uplink="", pool6="2001:db8:8::/64")
    if K_WG in forwarding:
        runner.links.add(IF)
    runner.sysctls.update(forwarding)
    n.start()
    assert runner.nft_tables["inet orbmesh"] == firewall.script(n.s, (), (), routed)
    n.forward()  # the helper switches nothing on without an uplink
    assert not any(c[:2] == ["sysctl", "-w"] for c in runner.calls) and not os.path.exists(n.state_path)


def test_ipv6_forwarding_without_ipv6_clients_needs_no_table(tmp_path):
    n, runner = make(tmp_path, nat_uplink="")  # ORBMESH_POOL6=off: peers carry no /128
    runner.sysctls[K6_ALL] = "1"
    n.start()
    assert runner.nft_tables == {} and ["sysctl", "-n", K6_ALL] not in runner.calls
    runner.sysctls[K_DEFAULT] = "1"  # control: IPv4 forwarding writes it
    n.start()
    assert "inet orbmesh" in runner.nft_tables


def test_a_kernel_without_ipv6_reads_as_not_forwarding(tmp_path):
    n, runner = make(tmp_path, nat_uplink="", pool6="2001:db8:8::/64")
    del runner.sysctls[K6_ALL]  # sysctl: cannot stat
    n.start()
    assert runner.nft_tables == {}


# --- apply ----------------------------------------------------------------------

def test_apply_exact_argv_and_stdin(tmp_path):
    n, runner = make(tmp_path)
    up(n)
    assert runner.calls == APPLY_CALLS
    assert runner.stdins == [(["nft", "-f", "-"], SCRIPT_V4)]
    assert runner.sysctls[K_WG] == runner.sysctls[K_UP] == "1"
    assert runner.sysctls[K6_WG] == "0"  # no ORBMESH_POOL6: IPv6 untouched
    assert list(runner.nft_tables) == ["inet orbmesh"]


def test_apply_with_pool6_sets_ipv6_forwarding_on_wireguard_only(tmp_path):
    n, runner = make(tmp_path, pool6="fd00:8::/64")
    up(n)
    assert runner.calls[-2:] == [["sysctl", "-n", K6_WG], ["sysctl", "-w", K6_WG + "=1"]]
    assert not any("ipv6/conf/%s/" % UP in " ".join(c) for c in runner.calls)
    assert "ip6 saddr fd00:8::/64 masquerade" in runner.stdins[0][1]


def test_apply_is_idempotent(tmp_path):
    n, runner = make(tmp_path)
    up(n)
    runner.clear()
    up(n)
    # The same single nft run with the same delete-and-recreate text; the
    # sysctls are already 1, so they are only read.
    assert runner.calls == [["ip", "-o", "address", "show"], ["nft", "-f", "-"], ["sysctl", "-n", K_WG],
                            ["sysctl", "-n", K_UP]]
    assert [s for _, s in runner.stdins] == [SCRIPT_V4, SCRIPT_V4]
    assert n.saved == {K_WG: "0", K_UP: "0"}  # the original values, not our own 1


def test_restarts_give_the_same_single_nft_run(tmp_path):
    n, runner = make(tmp_path)
    for _ in range(3):
        up(n)
        assert n.stop()
    nft_runs = [c for c in runner.calls if c[:2] == ["nft", "-f"]]
    assert nft_runs == [["nft", "-f", "-"]] * 3
    assert [s for _, s in runner.stdins] == [SCRIPT_V4] * 3
    assert runner.nft_tables == {} and runner.sysctls[K_UP] == "0"


def test_forwarding_already_on_is_not_written_or_restored(tmp_path):
    n, runner = make(tmp_path)
    runner.sysctls[K_UP] = "1"
    up(n)
    assert ["sysctl", "-w", K_UP + "=1"] not in runner.calls
    runner.clear()
    assert n.stop()
    assert ["sysctl", "-w", K_UP + "=1"] not in runner.calls and runner.sysctls[K_UP] == "1"


def test_apply_logs_one_line_per_step(tmp_path, caplog):
    n, _ = make(tmp_path)
    with caplog.at_level(logging.INFO, logger="wghelper.firewall"):
        up(n)
    assert [r.getMessage() for r in caplog.records] == [
        "nat: table inet orbmesh applied: clients out of up0 only",
        "nat: %s = 1 (was 0)" % K_WG,
        "nat: %s = 1 (was 0)" % K_UP,
    ]


def test_missing_uplink_turns_forwarding_back_off_and_keeps_the_table(tmp_path):
    """ORBMESH_NAT_UPLINK names no link (a typo): forwarding is what it was, the filter stays."""
    n, runner = make(tmp_path)
    del runner.sysctls[K_UP]  # no such interface
    n.start()
    with pytest.raises(CommandFailed) as info:
        n.forward()
    assert "cannot stat" in info.value.stderr
    assert ["sysctl", "-w", K_WG + "=1"] in runner.calls  # switched on before the failure ...
    assert runner.sysctls[K_WG] == "0"                     # ... and off again
    assert runner.nft_tables == {"inet orbmesh": SCRIPT_V4}  # fail closed: never deleted on a failed start
    assert ["nft", "delete", "table", "inet", "orbmesh"] not in runner.calls
    assert not os.path.exists(tmp_path / firewall.STATE_FILE)


def test_a_failed_start_after_a_healthy_one_turns_off_what_the_first_turned_on(tmp_path):
    """The issue's sequence: a healthy helper, then one whose uplink setting names no link."""
    n, runner = make(tmp_path)
    up(n)
    assert runner.sysctls[K_WG] == runner.sysctls[K_UP] == "1"
    typo = Firewall(settings(nat_uplink="eth-typo"), Commands(runner), str(tmp_path / firewall.STATE_FILE))
    typo.start()
    with pytest.raises(CommandFailed):
        typo.forward()
    assert runner.sysctls[K_WG] == runner.sysctls[K_UP] == "0"  # as before the first helper
    assert runner.nft_tables["inet orbmesh"] == firewall.script(typo.s)  # clients out of eth-typo only: nowhere


def test_nft_failure_changes_no_sysctl_and_deletes_nothing(tmp_path):
    n, runner = make(tmp_path)
    runner.nft_tables["inet orbmesh"] = "an earlier table"
    runner.fail = lambda argv: "Error: Could not process rule" if argv[:2] == ["nft", "-f"] else None
    with pytest.raises(CommandFailed):
        n.start()
    # No link yet: nothing else to do.  The earlier table stays as it was (nft's transaction is atomic).
    assert runner.calls == [["ip", "-o", "address", "show"], ["nft", "-f", "-"], ["ip", "-o", "link", "show", "dev", IF]]
    assert runner.nft_tables == {"inet orbmesh": "an earlier table"}
    assert runner.sysctls == {K_WG: "0", K_UP: "0", K6_WG: "0", K_ALL: "0", K_DEFAULT: "0", K6_ALL: "0"}


def test_a_table_that_cannot_be_written_takes_an_existing_interface_down(tmp_path):
    """No filter for clients of an adopted interface: no path for them either, until a start succeeds."""
    n, runner = make(tmp_path)
    runner.adopted(IF)
    runner.fail = lambda argv: "not found in PATH" if argv[0] == "nft" else None  # no nft at all
    with pytest.raises(CommandFailed):
        n.start()
    assert runner.calls[-2:] == [["ip", "-o", "link", "show", "dev", IF], ["ip", "link", "set", "dev", IF, "down"]]
    assert not any(c[:2] == ["sysctl", "-w"] for c in runner.calls)
    # Control: a table that can be written leaves the link alone.
    runner.fail = None
    runner.clear()
    n.start()
    assert not any(c[:3] == ["ip", "link", "set"] for c in runner.calls)


# --- stop ---------------------------------------------------------------------

def test_remove_deletes_the_table_then_restores_sysctls(tmp_path):
    n, runner = make(tmp_path)
    up(n)
    runner.clear()
    assert n.stop() is True
    assert runner.calls == [
        ["nft", "delete", "table", "inet", "orbmesh"],
        ["sysctl", "-n", K_UP], ["sysctl", "-w", K_UP + "=0"],
        ["sysctl", "-n", K_WG], ["sysctl", "-w", K_WG + "=0"],
    ]
    assert runner.sysctls[K_WG] == runner.sysctls[K_UP] == "0" and runner.nft_tables == {}
    assert not os.path.exists(tmp_path / firewall.STATE_FILE)


def test_remove_ignores_a_missing_table(tmp_path):
    n, runner = make(tmp_path)
    assert n.stop() is True
    assert runner.calls == [["nft", "delete", "table", "inet", "orbmesh"]]


def test_remove_reports_other_nft_failures(tmp_path):
    n, runner = make(tmp_path)
    up(n)
    runner.fail = lambda argv: "Error: Operation not permitted" if argv[:2] == ["nft", "delete"] else None
    assert n.stop() is False
    assert runner.sysctls[K_UP] == "0"  # the other steps still ran


def test_remove_skips_an_interface_that_is_gone(tmp_path):
    n, runner = make(tmp_path)
    up(n)
    del runner.sysctls[K_WG]  # the WireGuard link went away
    assert n.stop() is True
    assert runner.sysctls[K_UP] == "0" and runner.nft_tables == {}


# --- crash: the state file ------------------------------------------------------

def test_state_file_remembers_originals_across_restarts_and_down(tmp_path):
    first, runner = make(tmp_path)
    up(first)
    state = tmp_path / firewall.STATE_FILE
    assert json.loads(state.read_text()) == {"sysctl": {K_WG: "0", K_UP: "0"}}
    assert oct(os.stat(state).st_mode & 0o777) == "0o600"
    # A helper stops (or is killed) and leaves all as it is.  The next finds forwarding at 1 ...
    second = Firewall(first_settings(), Commands(runner), str(state))
    up(second)
    assert second.saved == {K_WG: "0", K_UP: "0"}  # ... and still knows the original 0
    # `orbmesh-wghelper down`, a process of its own, restores it from the file.
    assert Firewall(first_settings(), Commands(runner), str(state)).stop()
    assert runner.sysctls[K_UP] == runner.sysctls[K_WG] == "0" and runner.nft_tables == {} and not state.exists()


def first_settings():
    return settings(nat_uplink=UP)


def test_garbage_state_file_is_ignored(tmp_path):
    n, runner = make(tmp_path)
    (tmp_path / firewall.STATE_FILE).write_text(json.dumps(
        {"sysctl": {"kernel/core_pattern": "0", "net/ipv4/conf/x y/forwarding": "0", K_UP: "1; rm"}}))
    up(n)
    assert n.saved == {K_WG: "0", K_UP: "0"}
    (tmp_path / firewall.STATE_FILE).write_text("not json")
    assert make(tmp_path)[0]._load_state() == {}


# --- the interface hook --------------------------------------------------------

def test_interface_recreation_sets_forwarding_again(tmp_path):
    n, runner = make(tmp_path)
    up(n)
    iface = Interface(settings(nat_uplink=UP), Commands(runner), FAKE_KEYFILE, socket_dir=str(tmp_path))
    iface.on_up = n.reapply  # as __main__ wires it
    runner.sysctls[K_WG] = "0"  # a new link starts with the default
    runner.address_text = ADDRESSES  # and the host's networks changed meanwhile
    runner.clear()
    iface.up()
    assert ["sysctl", "-w", K_WG + "=1"] in runner.calls and ["sysctl", "-w", K_UP + "=1"] not in runner.calls
    assert runner.sysctls[K_WG] == "1" and n.saved[K_WG] == "0"  # the value from before the first start
    assert runner.nft_tables["inet orbmesh"] == firewall.script(n.s, (), firewall.connected(ADDRESSES))


def test_recreation_without_uplink_or_bridges_writes_nothing(tmp_path):
    runner = FakeRunner()
    fw = Firewall(settings(), Commands(runner))
    iface = Interface(settings(), Commands(runner), FAKE_KEYFILE, socket_dir=str(tmp_path))
    iface.on_up = fw.reapply  # as __main__ wires it
    iface.up()
    # It looks whether the host forwards (it does not), and changes nothing.
    assert iface.running and not any(c[:2] in (["nft", "-f"], ["sysctl", "-w"]) for c in runner.calls)
    assert ["sysctl", "-n", "net/ipv4/conf/%s/forwarding" % IF] in runner.calls


def test_a_failing_hook_tears_the_interface_down(tmp_path):
    runner = FakeRunner()
    iface = Interface(settings(), Commands(runner), FAKE_KEYFILE, socket_dir=str(tmp_path))

    def hook():
        raise CommandFailed("sysctl", 255, "boom")

    iface.on_up = hook
    with pytest.raises(CommandFailed):
        iface.up()
    assert not iface.running and IF not in runner.links


# --- settings -------------------------------------------------------------------

def test_nat_is_off_by_default_and_isolation_on():
    s = load({})
    assert (s.nat_uplink, s.nat_table, s.pool6) == (None, "orbmesh", "auto")  # IPv6 on, NAT off
    assert (s.client_to_client, s.allowed_destinations, s.client_node_ports, s.dns_resolver) == ("off", None, None,
                                                                                                 "on")
    assert firewall.forwarding_keys(s) == []


def test_nat_settings():
    s = load({"ORBMESH_NAT_UPLINK": "eth0.100", "ORBMESH_NAT_TABLE": "_om_2",
              "ORBMESH_POOL6": "fd00:8::/64"})
    assert (s.nat_uplink, s.nat_table, s.pool6) == ("eth0.100", "_om_2", ipaddress.ip_network("fd00:8::/64"))


@pytest.mark.parametrize("name, value", [
    ("NAT_UPLINK", "eth 0"), ("NAT_UPLINK", "a" * 16), ("NAT_UPLINK", 'eth0"'), ("NAT_UPLINK", "eth0\n1"),
    ("NAT_UPLINK", ".."), ("NAT_UPLINK", "eth0;drop"), ("NAT_UPLINK", "wg0"),  # wg0: the WireGuard interface
    ("NAT_TABLE", "orb-mesh"), ("NAT_TABLE", "a" * 33), ("NAT_TABLE", "orb mesh"), ("NAT_TABLE", "1orbmesh"),
    ("NAT_TABLE", "orb\nmesh"), ("NAT_TABLE", "orbmesh;"), ("NAT_TABLE", 'o"'),
    ("POOL6", "10.8.0.0/16"), ("POOL6", "fd00:8::1/64"), ("POOL6", "nope"),
    ("CLIENT_TO_CLIENT", "yes"), ("DNS_RESOLVER", "maybe"), ("ALLOWED_DESTINATIONS", "10.0.0.1/8"),
    ("ALLOWED_DESTINATIONS", "10.0.0.0/8;"), ("ALLOWED_DESTINATIONS", "example.com"), ("CLIENT_NODE_PORTS", "0"),
    ("CLIENT_NODE_PORTS", "65536"), ("CLIENT_NODE_PORTS", "https"), ("CLIENT_NODE_PORTS", "22-25"),
])
def test_bad_nat_values_name_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        load({"ORBMESH_" + name: value})
    assert str(info.value).startswith("ORBMESH_%s: " % name)


# --- the real Runner (nothing is changed: a missing key) ---------------------------

def test_real_runner_sysctl_missing_key_says_cannot_stat():
    need("sysctl")
    with pytest.raises(CommandFailed) as info:
        Commands(Runner(timeout=5)).read_sysctl("net/ipv4/conf/om-nonexist0/forwarding")
    assert info.value.command == "sysctl" and firewall._NO_KEY in info.value.stderr


def test_a_helper_without_nat_starts_on_a_host_without_nft(tmp_path):
    runner = FakeRunner()
    runner.fail = lambda argv: "not found in PATH" if argv[0] == "nft" else None
    fw = Firewall(settings(), Commands(runner), str(tmp_path / firewall.STATE_FILE))
    fw.start()  # a host that forwards nothing: nothing to clean up, nothing to install
    assert runner.calls[-1] == ["nft", "delete", "table", "inet", "orbmesh"]
    with pytest.raises(CommandFailed):  # control: with NAT asked for, a missing nft is fatal
        Firewall(settings(nat_uplink=UP), Commands(runner), None).start()
    runner.sysctls["net/ipv4/conf/default/forwarding"] = "1"
    with pytest.raises(CommandFailed):  # and so on a host that forwards: no filter, no start
        fw.start()


# --- speed tiers and quota backstops in the same table (wghelper/limits.py) ----------

def tier(*addresses, rate=20, quota=None, used=0, period=0):
    return {"addresses": list(addresses), "rate_mbps": rate, "quota": quota, "used": used, "period": period}


def test_limits_alone_write_a_table_with_only_them_then_change_elements(tmp_path):
    runner = FakeRunner()
    fw = Firewall(settings(), Commands(runner), str(tmp_path / firewall.STATE_FILE))
    fw.start()
    runner.clear()
    fw.set_limits([({"u1": tier("10.8.0.2")}, False)])
    assert [c for c in runner.calls if c[0] != "sysctl"][-2:] == [["ip", "-o", "address", "show"],
                                                                  ["nft", "-f", "-"]]  # whole: no table before
    assert runner.stdins[-1][1] == firewall.script(fw.s, limits=limits.view(fw.plans), isolating=False)
    assert "chain from_clients" not in runner.stdins[-1][1]  # a node that forwards nothing: no isolation rules
    runner.clear()
    fw.set_limits([({"u1": tier("10.8.0.2", "10.8.0.3")}, False), ({"u2": tier("10.8.0.4")}, False)])
    assert runner.calls == [["nft", "-f", "-"]] and len(runner.nft_updates) == 1  # one transaction, two requests
    assert fw.rates == {20: 3} and fw.written.tiers == {"10.8.0.2": 20, "10.8.0.3": 20, "10.8.0.4": 20}
    assert runner.nft_updates[0].count("add element") == 2 and "delete" not in runner.nft_updates[0]  # one set each
    runner.clear()
    assert fw.set_limits([({"u1": tier("10.8.0.2", "10.8.0.3")}, False)])["addresses"] == 3
    assert runner.calls == []  # nothing changed: no run
    fw.set_limits([({"u2": tier()}, False)])
    assert fw.rates == {20: 2} and fw.owners == {"10.8.0.2": "u1", "10.8.0.3": "u1"}
    fw.set_limits([({"u1": tier(), "u2": tier()}, False)])
    assert runner.calls[-1] == ["nft", "delete", "table", "inet", "orbmesh"] and fw.plans == {}
    assert runner.nft_tables == {}


def test_a_new_tier_writes_the_table_whole_with_the_isolation_rules(tmp_path):
    fw, runner = make(tmp_path)
    fw.start()
    fw.set_limits([({"u1": tier("10.8.0.2")}, False)])
    runner.clear()
    fw.set_limits([({"u2": tier("10.8.0.3", rate=50)}, False)])
    assert runner.calls == [["ip", "-o", "address", "show"], ["nft", "-f", "-"]]  # an uplink: no sysctl to read
    written = runner.stdins[-1][1]
    assert "vmap { 0 : goto quota_up4, 20 : goto tier_20_up4, 50 : goto tier_50_up4 }" in written and "chain from_clients" in written
    # The last limit gone: the table stays for the uplink, without the limits part.
    fw.set_limits([({}, True)])
    assert runner.stdins[-1][1] == SCRIPT_V4


def test_a_quota_keeps_what_the_kernel_counted_when_the_table_is_written_again(tmp_path):
    fw, runner = make(tmp_path)
    fw.start()
    fw.set_limits([({"u1": tier("10.8.0.2", rate=None, quota=1000, used=10)}, False)])
    name = limits.quota_name("u1", limits.Plan((), quota=1000))
    assert "quota %s {\n\t\tover 961 bytes used 9 bytes" % name in runner.stdins[-1][1]  # the kernel's share
    runner.quota_used = {name: 600}  # what the kernel has counted since
    runner.clear()
    fw.apply(["wgt0b1"])  # a bridge comes up: the table is written whole
    assert runner.calls[:2] == [["nft", "-j", "list", "quotas", "table", "inet", "orbmesh"],
                                ["ip", "-o", "address", "show"]]
    assert "over 961 bytes used 600 bytes" in runner.stdins[-1][1]
    runner.clear()
    assert fw.over_quota() == [] and runner.calls == [["nft", "-j", "list", "quotas", "table", "inet", "orbmesh"]]
    runner.quota_used = {name: 961}
    assert fw.over_quota() == ["u1"]
    # A new period is a new object, from the app's count; the old one goes.
    runner.clear()
    fw.set_limits([({"u1": tier("10.8.0.2", rate=None, quota=1000, used=0, period=1)}, False)])
    assert runner.calls == [["nft", "-f", "-"]]
    assert "delete quota inet orbmesh %s" % name in runner.nft_updates[-1]
    fw.set_limits([({"u1": tier("10.8.0.2")}, False)])
    runner.clear()
    assert fw.over_quota() == [] and runner.calls == []  # no quota left: nothing run


def test_a_quota_object_follows_the_usage_the_app_counted(tmp_path):
    fw, runner = make(tmp_path)
    fw.start()
    fw.set_limits([({"u1": tier("10.8.0.2", quota=1000, used=100)}, False)])
    name = limits.quota_name("u1", limits.Plan((), quota=1000))
    runner.quota_used = {name: 500}  # IP bytes the kernel counted since
    runner.clear()
    # The app counted 600 in all: from the kernel's 500, the object lets through 25/26 of the 400 left.
    fw.set_limits([({"u1": tier("10.8.0.2", quota=1000, used=600)}, False)])
    assert runner.calls == [["nft", "-j", "list", "quotas", "table", "inet", "orbmesh"], ["nft", "-f", "-"]]
    assert runner.nft_updates[-1] == "add quota inet orbmesh %s { over 884 bytes }\n" % name
    assert fw.written.quotas == {name: (884, 500)}
    runner.quota_used = {name: 884}
    assert fw.over_quota() == ["u1"]
    # The same count again (a connect's push) moves nothing; a whole write keeps the aimed limit.
    runner.clear()
    fw.set_limits([({"u1": tier("10.8.0.2", "10.8.0.3", quota=1000, used=600)}, False)])
    assert [c for c in runner.calls if c[:2] == ["nft", "-j"]] == [] and "add quota" not in runner.nft_updates[-1]
    fw.apply(["wgt0b1"])
    assert "over 884 bytes used 884 bytes" in runner.stdins[-1][1], runner.stdins[-1][1][:200]
    # A listing that fails leaves the object where it was aimed; the request's other changes still go in.
    runner.fail = lambda argv: "Error: netlink: out of memory" if argv[:2] == ["nft", "-j"] else None
    fw.set_limits([({"u1": tier("10.8.0.2", "10.8.0.3", "10.8.0.4", quota=1000, used=700)}, False)])
    assert fw.written.quotas == {name: (884, 884)} and "10.8.0.4" in fw.owners


def test_a_failed_write_changes_nothing(tmp_path):
    fw, runner = make(tmp_path)
    fw.start()
    fw.set_limits([({"u1": tier("10.8.0.2")}, False)])
    before, written = dict(fw.plans), fw.written
    runner.fail = lambda argv: "Error: syntax error" if argv[:2] == ["nft", "-f"] else None
    with pytest.raises(CommandFailed):
        fw.set_limits([({"u2": tier("10.8.0.3", rate=7)}, False)])     # whole
    with pytest.raises(CommandFailed):
        fw.set_limits([({"u2": tier("10.8.0.3")}, False)])              # elements, then whole: both fail
    assert fw.plans == before and fw.written is written
    runner.fail = None
    fw.set_limits([({"u2": tier("10.8.0.3")}, False)])
    assert set(fw.plans) == {"u1", "u2"}


def test_an_element_update_that_fails_falls_back_to_the_whole_table(tmp_path):
    fw, runner = make(tmp_path)
    fw.start()
    fw.set_limits([({"u1": tier("10.8.0.2")}, False)])
    runner.nft_tables.clear()  # someone deleted the table behind our back
    runner.clear()
    fw.set_limits([({"u1": tier("10.8.0.2", "10.8.0.3")}, False)])
    assert runner.calls == [["nft", "-f", "-"], ["ip", "-o", "address", "show"], ["nft", "-f", "-"]]
    assert "\tmap plan4 {\n\t\ttype ipv4_addr : mark\n\t\telements = { 10.8.0.2 : 20, 10.8.0.3 : 20 }\n" in \
        runner.nft_tables["inet orbmesh"]


def test_limits_come_back_after_the_interface_is_made_again_without_nat(tmp_path):
    runner = FakeRunner()
    fw = Firewall(settings(), Commands(runner), None)
    fw.start()
    fw.set_limits([({"u1": tier("10.8.0.2")}, False)])
    runner.nft_tables.clear()
    fw.reapply()
    assert "\tmap plan4 {\n\t\ttype ipv4_addr : mark\n\t\telements = { 10.8.0.2 : 20 }\n" in runner.nft_tables["inet orbmesh"]
    assert not any(c[:2] == ["sysctl", "-w"] for c in runner.calls)  # no uplink: forwarding untouched
