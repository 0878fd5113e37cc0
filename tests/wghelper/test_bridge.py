"""Bridge commands of the helper (wghelper/bridge.py): exact argv and refusals, via the fake runner."""
import pytest

from wghelper import bridge, firewall
from wghelper.bridge import Bridges, parse_rules
from wghelper.firewall import Firewall

from wghelper.errors import ConfigError

from .fakes import BRIDGE_KEYFILE, BRIDGE_PUBLIC, FAKE_IF, Helper, key, peer, settings

IF = FAKE_IF
LINK = IF + "b3"
EXIT_KEY = key(9)
EXITS = "10.9.0.0/16,192.0.2.0/24"  # ORBMESH_BRIDGE_NETWORKS of these tests
SPEC = {"slot": 3, "public_key": EXIT_KEY, "endpoint": "198.51.100.1:51820", "address": "10.9.255.1",
        "keepalive": 25}
SCRIPT = """\
table inet orbmesh {}
delete table inet orbmesh
table inet orbmesh {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "wgt0b3" ip saddr 10.8.0.0/16 masquerade
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "wgt0" jump to_node
\t\tiifname "wgt0b3" ct state established,related accept
\t\tiifname "wgt0b3" drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "wgt0" jump from_clients
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
\t\tip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.0.0.0/24, \
192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3 } drop
\t\toifname "wgt0b3" ip saddr 10.8.0.0/16 accept
\t\tdrop
\t}
}
"""
UP_CALLS = [
    ["ip", "-o", "address", "show"],   # the address is neither local nor on a connected network
    ["ip", "-o", "link", "show", "dev", LINK],     # no link of that name that is not ours
    ["ip", "-o", "link", "show", "dev", LINK],
    ["ip", "link", "add", "dev", LINK, "type", "wireguard"],
    ["wg", "show", LINK, "peers"],
    ["wg", "set", LINK, "private-key", BRIDGE_KEYFILE, "peer", EXIT_KEY, "endpoint", "198.51.100.1:51820",
     "allowed-ips", "0.0.0.0/0", "persistent-keepalive", "25"],
    ["ip", "-o", "address", "show", "dev", LINK],
    ["ip", "-4", "address", "flush", "dev", LINK],    # only when the address is not there yet
    ["ip", "-4", "address", "replace", "10.9.255.1/32", "dev", LINK],
    ["ip", "link", "set", "dev", LINK, "mtu", "1420", "up"],
    ["sysctl", "-w", "net/ipv4/conf/%s/forwarding=1" % IF],
    ["sysctl", "-w", "net/ipv4/conf/%s/forwarding=1" % LINK],
    ["sysctl", "-n", "net/ipv4/conf/all/forwarding"],  # no uplink: does the host route clients itself?
    ["ip", "-o", "address", "show"],  # the host's networks, blocked for clients
    ["nft", "-f", "-"],     # masquerade before the route
    ["ip", "-4", "route", "replace", "default", "dev", LINK, "table", "51903"],
    ["ip", "-4", "route", "replace", "unreachable", "default", "metric", "4294967295", "table", "51903"],
    ["ip", "-o", "link", "show", "dev", LINK],    # its ifindex: the watcher tells a link made again by it
]


def with_bridges(tmp_path, networks=EXITS):
    h = Helper(tmp_path, bridge_networks=networks).start()
    fw = Firewall(h.settings, h.cmd)
    h.ctx.bridges = Bridges(h.settings, h.cmd, fw, BRIDGE_KEYFILE, BRIDGE_PUBLIC, socket_dir=str(tmp_path))
    for name in (IF, LINK, IF + "b0"):
        h.runner.sysctls["net/ipv4/conf/%s/forwarding" % name] = "0"
    return h


@pytest.fixture
def helper(tmp_path):
    h = with_bridges(tmp_path)
    yield h
    h.writer.stop()


def test_bridge_up_exact_argv_and_idempotent(helper):
    result = helper.result("bridge_up", SPEC)
    assert result == {"interface": LINK, "table": 51903, "public_key": BRIDGE_PUBLIC}
    assert helper.runner.calls == UP_CALLS
    assert helper.runner.stdins[-1] == (["nft", "-f", "-"], SCRIPT)
    assert helper.result("hello")["bridges"] == [3]
    helper.runner.clear()
    helper.result("bridge_up", SPEC)  # the same again: only the existence check
    assert helper.runner.calls == [["ip", "-o", "link", "show", "dev", LINK]]


def test_bridge_rules_add_replace_remove_exclusive(helper):
    r = helper.runner
    assert helper.result("bridge_rules", {"add": [{"address": "10.8.0.2", "slot": 3}]})["added"] == 1
    assert r.calls == [
        ["ip", "-4", "rule", "show", "pref", "20000"],
        ["ip", "-4", "route", "replace", "unreachable", "default", "metric", "4294967295", "table", "51903"],
        ["ip", "-4", "rule", "add", "pref", "20000", "from", "10.8.0.2/32", "lookup", "51903"],
    ]
    r.clear()
    assert helper.result("bridge_rules", {"add": [{"address": "10.8.0.2", "slot": 3}]})["added"] == 0
    assert r.calls == [["ip", "-4", "rule", "show", "pref", "20000"]]  # already there: no duplicate
    r.clear()
    helper.result("bridge_rules", {"add": [{"address": "10.8.0.2", "slot": 5}]})  # moved to another exit
    assert r.calls[1] == ["ip", "-4", "rule", "del", "pref", "20000", "from", "10.8.0.2/32"]
    assert r.rules == {"10.8.0.2": ("20000", "51905")}
    helper.result("bridge_rules", {"add": [{"address": "10.8.0.3", "slot": 5}]})
    result = helper.result("bridge_rules", {"add": [{"address": "10.8.0.3", "slot": 5}], "exclusive": True})
    assert result == {"added": 0, "removed": 1, "rules": 1}
    assert r.rules == {"10.8.0.3": ("20000", "51905")}
    r.clear()
    assert helper.result("bridge_rules", {"remove": ["10.8.0.3", "10.8.0.9"]})["removed"] == 1
    assert r.calls == [["ip", "-4", "rule", "show", "pref", "20000"],
                       ["ip", "-4", "rule", "del", "pref", "20000", "from", "10.8.0.3/32"]]


def test_bridge_down_removes_rules_table_nft_and_link(helper):
    helper.result("bridge_up", SPEC)
    helper.result("bridge_rules", {"add": [{"address": "10.8.0.2", "slot": 3}, {"address": "10.8.0.4", "slot": 1}]})
    helper.runner.clear()
    assert helper.result("bridge_down", {"slot": 3}) == {"interface": LINK}
    assert helper.runner.calls == [
        ["ip", "-4", "rule", "show", "pref", "20000"],
        ["ip", "-4", "rule", "del", "pref", "20000", "from", "10.8.0.2/32"],
        ["ip", "-4", "route", "flush", "table", "51903"],
        ["ip", "-o", "link", "show", "dev", LINK],
        ["ip", "link", "del", "dev", LINK],
        # The last bridge gone, no uplink: the table stays while the WireGuard interface forwards (the
        # bridge switched that on), now with no way out for clients.
        ["sysctl", "-n", "net/ipv4/conf/all/forwarding"],
        ["ip", "-o", "link", "show", "dev", IF],
        ["sysctl", "-n", "net/ipv4/conf/%s/forwarding" % IF],
        ["ip", "-o", "address", "show"],
        ["nft", "-f", "-"],
    ]
    assert helper.runner.nft_tables["inet orbmesh"] == firewall.script(helper.settings, [])
    assert helper.runner.rules == {"10.8.0.4": ("20000", "51901")}  # another bridge's client stays
    assert helper.result("hello")["bridges"] == []
    helper.runner.clear()
    helper.result("bridge_down", {"slot": 3})  # again: nothing there, still fine
    assert ["ip", "link", "del", "dev", LINK] not in helper.runner.calls


def test_a_new_helper_adopts_the_links_and_keeps_their_masquerade(helper):
    """A restarted helper finds the bridge links up: its first ruleset keeps masquerading them, and the
    app's next bridge_up re-sends the spec without taking the link down or flushing its address."""
    helper.result("bridge_up", SPEC)
    helper.runner.links.add("other0")  # not ours: never adopted
    fresh = Bridges(helper.settings, helper.cmd, Firewall(helper.settings, helper.cmd), BRIDGE_KEYFILE,
                    BRIDGE_PUBLIC)
    assert fresh.adopt() == [LINK] and fresh.running() == [3]
    fresh.firewall.start(fresh.adopt())
    assert helper.runner.nft_tables["inet orbmesh"] == SCRIPT
    helper.ctx.bridges = fresh
    helper.runner.clear()
    helper.result("bridge_up", SPEC)
    calls = helper.runner.calls
    assert ["wg", "show", LINK, "dump"] in calls and ["ip", "-4", "address", "flush", "dev", LINK] not in calls
    assert not any(c[:3] in (["ip", "link", "del"], ["ip", "link", "add"]) for c in calls)
    assert LINK in helper.runner.links


def test_remove_all_takes_down_every_bridge_whoever_made_it(helper):
    """`orbmesh-wghelper down`: links, rules and routing tables of every slot, from a fresh process."""
    helper.result("bridge_up", SPEC)
    helper.result("bridge_up", dict(SPEC, slot=0))
    helper.result("bridge_rules", {"add": [{"address": "10.8.0.2", "slot": 3}, {"address": "10.8.0.4", "slot": 0}]})
    helper.runner.clear()
    Bridges(helper.settings, helper.cmd, Firewall(helper.settings, helper.cmd), BRIDGE_KEYFILE,
            BRIDGE_PUBLIC).remove_all()
    assert LINK not in helper.runner.links and IF + "b0" not in helper.runner.links
    assert IF in helper.runner.links  # the main interface is not a bridge
    assert helper.runner.rules == {}
    flushed = [c for c in helper.runner.calls if c[:4] == ["ip", "-4", "route", "flush"]]
    assert len(flushed) == 64 and ["ip", "-4", "route", "flush", "table", "51903"] in flushed


@pytest.mark.parametrize("args, field", [
    (dict(SPEC, slot=64), "slot"),
    (dict(SPEC, slot=-1), "slot"),
    (dict(SPEC, slot=True), "slot"),
    (dict(SPEC, slot="3"), "slot"),
    (dict(SPEC, public_key="x"), "public_key"),
    (dict(SPEC, endpoint=None), "endpoint"),
    (dict(SPEC, endpoint="exit.example:51820"), "endpoint"),
    (dict(SPEC, address="10.8.0.5"), "address"),          # inside our own pool
    (dict(SPEC, address="10.9.255.1/32"), "address"),
    (dict(SPEC, address="10.9.255.1; reboot"), "address"),
    (dict(SPEC, address="224.0.0.1"), "address"),
    (dict(SPEC, interface="eth0"), "interface"),
    ({"slot": 3}, "public_key"),
])
def test_bridge_up_refuses_bad_arguments(helper, args, field):
    reply = helper.call("bridge_up", args)
    assert not reply["ok"] and reply["error"]["code"] == "INVALID_ARGUMENT"
    assert reply["error"]["details"]["field"] == field
    assert helper.runner.calls == []


@pytest.mark.parametrize("args", [
    {"add": [{"address": "192.0.2.7", "slot": 0}]},                 # not a client address of the pool
    {"add": [{"address": "10.8.0.1", "slot": 0}]},                  # the gateway
    {"add": [{"address": "10.8.0.2/32", "slot": 0}]},
    {"add": [{"address": "10.8.0.2", "slot": 0, "table": "main"}]},
    {"add": [{"address": "10.8.0.2", "slot": 0}, {"address": "10.8.0.2", "slot": 1}]},
    {"add": [{"address": "10.8.0.2", "slot": 0}], "remove": ["10.8.0.2"]},
    {"remove": ["10.8.0.2 lookup main"]},
    {"exclusive": "yes"},
    {"priority": 1},
])
def test_bridge_rules_refuse_bad_arguments(helper, args):
    reply = helper.call("bridge_rules", args)
    assert not reply["ok"] and reply["error"]["code"] == "INVALID_ARGUMENT"
    assert helper.runner.calls == []


def test_without_bridges_the_commands_answer_an_error(tmp_path):
    h = Helper(tmp_path).start()
    try:
        reply = h.call("bridge_down", {"slot": 0})
        assert not reply["ok"] and reply["error"]["code"] == "INTERFACE_DOWN"
    finally:
        h.writer.stop()


def test_two_bridges_share_the_table_and_keep_it_until_the_last_goes(helper):
    helper.result("bridge_up", SPEC)
    helper.result("bridge_up", dict(SPEC, slot=0))
    assert helper.runner.nft_tables["inet orbmesh"] == firewall.script(helper.settings, [IF + "b0", LINK])
    helper.result("bridge_down", {"slot": 3})
    assert helper.runner.nft_tables["inet orbmesh"] == firewall.script(helper.settings, [IF + "b0"])
    helper.result("bridge_down", {"slot": 0})
    assert helper.runner.nft_tables["inet orbmesh"] == firewall.script(helper.settings, [])  # wgt0 forwards
    helper.runner.sysctls["net/ipv4/conf/%s/forwarding" % IF] = "0"
    helper.result("bridge_down", {"slot": 0})
    assert helper.runner.nft_tables == {}  # nothing forwards any more: no table


def test_names_fit_and_rules_parse():
    assert bridge.link_name("abcdefghijklmno", 63) == "abcdefghijklb63"
    assert firewall.script(settings(), [LINK]) == SCRIPT
    text = "20000:\tfrom 10.8.0.2 lookup 51903\n20000:\tfrom all lookup main\n0:\tfrom all lookup local\n"
    assert parse_rules(text, 20000) == {"10.8.0.2": 51903}


@pytest.mark.parametrize("overrides", [{"interface": "abcdefghijklmb1"}, {"interface": "abcdefghijklb63"},
                                       {"nat_uplink": IF + "b7"}])
def test_a_bridge_link_named_like_the_interface_or_uplink_stops_the_start(overrides):
    """A 15-character ORBMESH_INTERFACE ending in b1 made slot 1's link the client interface itself: bridge_up
    then removed every client peer, swapped in the bridge key and flushed the gateway address."""
    s = settings(**overrides)
    with pytest.raises(ConfigError, match="bridge link"):
        Bridges(s, None, None, BRIDGE_KEYFILE, BRIDGE_PUBLIC)
    Bridges(settings(interface="abcdefghijklmno", nat_uplink="eth0"), None, None, BRIDGE_KEYFILE, BRIDGE_PUBLIC)


@pytest.mark.parametrize("not_ours", ["other key", "not WireGuard"])
def test_a_link_of_a_bridge_name_that_is_not_ours_is_left_alone(helper, not_ours):
    r = helper.runner
    helper.result("apply_peers", {"add": [peer(key(1))]})
    r.links.add(LINK)
    if not_ours == "other key":
        r.link_keys[LINK] = key(5)
    else:
        r.fail = lambda argv: "Unable to access interface: Operation not supported" if argv[:2] == ["wg", "show"] \
            and argv[2] == LINK else None
    r.clear()
    reply = helper.call("bridge_up", SPEC)
    assert not reply["ok"] and reply["error"]["code"] == "COMMAND_FAILED"
    assert helper.call("bridge_down", {"slot": 3})["ok"]
    assert [c for c in r.calls if LINK in c and c[:2] != ["ip", "link"] and c[:3] != ["ip", "-o", "link"]
            or c[:3] == ["ip", "link", "del"]] == [
        ["wg", "show", LINK, "dump"]] * 2
    assert LINK in r.links and key(1) in r.peers
    # Control: a link this helper's bridge key runs (left by a helper that was killed) is adopted.
    r.fail, r.link_keys[LINK] = None, BRIDGE_PUBLIC
    assert helper.result("bridge_up", SPEC)["interface"] == LINK


@pytest.mark.parametrize("address, networks", [
    ("10.9.255.1", ""),              # no ORBMESH_BRIDGE_NETWORKS: bridge mode is off
    ("198.51.100.7", EXITS),         # outside them
    ("192.0.2.1", EXITS),            # the uplink's own address
    ("192.0.2.254", EXITS),          # on the uplink's network: the upstream gateway, say
    ("10.9.0.2", EXITS),             # the far end of a point-to-point address
])
def test_bridge_address_only_from_exit_networks_and_never_local(tmp_path, address, networks):
    h = with_bridges(tmp_path, networks)
    try:
        h.runner.addresses.update({"uplink0": ["192.0.2.1/24"], "ptp0": ["10.9.0.1 peer 10.9.0.2/32"]})
        h.runner.clear()
        reply = h.call("bridge_up", dict(SPEC, address=address))
        assert not reply["ok"] and reply["error"]["code"] == "INVALID_ARGUMENT", reply
        assert reply["error"]["details"]["field"] == "address"
        assert h.runner.calls in ([], [["ip", "-o", "address", "show"]])
        # Control: an address of the exits' networks that is nowhere on this host, twice (a new endpoint).
        if networks:
            assert h.result("bridge_up", SPEC)["interface"] == LINK
            assert h.result("bridge_up", dict(SPEC, endpoint="198.51.100.2:51820"))["interface"] == LINK
    finally:
        h.writer.stop()


def test_down_and_adoption_leave_a_foreign_link_of_a_bridge_name_alone(helper):
    helper.result("bridge_up", SPEC)                      # ours, slot 3
    helper.runner.links.add(IF + "b0")                    # someone else's link with slot 0's name
    helper.runner.link_keys[IF + "b0"] = key(77)
    fresh = Bridges(helper.settings, helper.cmd, Firewall(helper.settings, helper.cmd), BRIDGE_KEYFILE,
                    BRIDGE_PUBLIC)
    assert fresh.adopt() == [LINK]                        # only ours is masqueraded by the next ruleset
    fresh.remove_all()
    assert LINK not in helper.runner.links                # control: ours goes
    assert IF + "b0" in helper.runner.links               # the foreign one stays
