"""The command table both sides share (wghelper/requests.py): names, and what each command's arguments may be."""
import pytest

from wghelper import requests
from wghelper.errors import Invalid
from wghelper.handlers import HANDLERS

from .fakes import key, peer, settings

S = settings(bridge_networks="10.9.0.0/16")


def test_every_command_has_a_handler_and_nothing_else_is_served():
    assert set(requests.COMMANDS) == set(HANDLERS) == {
        "hello", "status", "apply_peers", "dump_peers", "sync_peers", "bridge_up", "bridge_down", "bridge_rules",
        "limits", "usage"}


def test_arguments_come_back_normalised():
    assert requests.COMMANDS["apply_peers"]({"add": [peer(key(1), endpoint="[2001:DB8::1]:7")]}, S) == {
        "remove": [], "add": [{"public_key": key(1), "allowed_ips": ["10.8.0.2/32"],
                               "endpoint": "[2001:db8::1]:7", "keepalive": 0, "last_endpoint": None}]}
    assert requests.COMMANDS["bridge_rules"]({"add": [{"address": "10.8.0.2", "slot": 3}]}, S) == {
        "add": {"10.8.0.2": 3}, "remove": [], "exclusive": False}
    assert requests.COMMANDS["bridge_up"]({"slot": 1, "public_key": key(9), "endpoint": "198.51.100.1:51820",
                                           "address": "10.9.255.1"}, S)["keepalive"] == 25
    assert requests.COMMANDS["dump_peers"]({}, S) == {}
    assert requests.COMMANDS["dump_peers"]({"limit": 5}, S) == {"limit": 5}
    assert requests.COMMANDS["dump_peers"]({"dump": 3, "offset": 10, "limit": 5}, S) == {
        "dump": 3, "offset": 10, "limit": 5}


@pytest.mark.parametrize("cmd, args, field", [
    ("hello", {"x": 1}, "x"),
    ("status", {"verbose": True}, "verbose"),
    ("dump_peers", {"all": True}, "all"),
    ("dump_peers", {"limit": 0}, "limit"),
    ("dump_peers", {"limit": 65537}, "limit"),
    ("dump_peers", {"limit": True}, "limit"),
    ("dump_peers", {"dump": 1, "limit": 5}, "offset"),
    ("dump_peers", {"offset": 0, "limit": 5}, "dump"),
    ("dump_peers", {"dump": 1, "offset": 0}, "limit"),
    ("dump_peers", {"dump": 0, "offset": 0, "limit": 5}, "dump"),
    ("dump_peers", {"dump": 1, "offset": -1, "limit": 5}, "offset"),
    ("dump_peers", {"dump": "1", "offset": 0, "limit": 5}, "dump"),
    ("apply_peers", {}, "remove"),
    ("apply_peers", {"remove": [key(1)], "add": [peer(key(1))]}, "add[0].public_key"),
    ("apply_peers", {"add": [peer(key(1))], "interface": "eth0"}, "interface"),
    ("sync_peers", {}, "peers"),
    ("sync_peers", {"peers": [peer(key(1)), peer(key(2))]}, "peers[1].allowed_ips"),
    ("bridge_up", {"slot": 64, "public_key": key(1), "endpoint": "198.51.100.1:1", "address": "10.9.0.1"}, "slot"),
    # An endpoint is another host (issue 23): never this one's loopback, nor broadcast, multicast, nowhere.
    ("bridge_up", {"slot": 1, "public_key": key(1), "endpoint": "127.0.0.1:22", "address": "10.9.0.1"}, "endpoint"),
    ("bridge_up", {"slot": 1, "public_key": key(1), "endpoint": "[::ffff:127.0.0.1]:22", "address": "10.9.0.1"},
     "endpoint"),
    ("bridge_up", {"slot": 1, "public_key": key(1), "endpoint": "255.255.255.255:1", "address": "10.9.0.1"},
     "endpoint"),
    ("apply_peers", {"add": [peer(key(1), endpoint="[::1]:51820")]}, "add[0].endpoint"),
    ("sync_peers", {"peers": [peer(key(1), endpoint="127.0.0.53:53")]}, "peers[0].endpoint"),
    ("sync_peers", {"peers": [peer(key(1), last_endpoint="255.255.255.255:9")]}, "peers[0].last_endpoint"),
    ("bridge_down", {"slot": "0"}, "slot"),
    ("bridge_rules", {"add": [{"address": "10.8.0.2", "slot": 0}], "remove": ["10.8.0.2"]}, "remove"),
    ("bridge_rules", {"remove": ["10.8.0.2", "10.8.0.2"]}, "remove[1]"),
    ("limits", {}, "users"),
    ("limits", {"users": [{"user": "u 1", "addresses": []}]}, "users[0].user"),
    ("limits", {"users": [{"user": "u1"}]}, "users[0].addresses"),
    ("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.1"]}]}, "users[0].addresses[0]"),  # the gateway
    ("limits", {"users": [{"user": "u1", "addresses": ["10.9.0.2"]}]}, "users[0].addresses[0]"),
    ("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.2/32"]}]}, "users[0].addresses[0]"),
    ("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.2", "10.8.0.2"]}]}, "users[0].addresses[1]"),
    ("limits", {"users": [{"user": "u1", "addresses": ["10.8.0.2"]}, {"user": "u2", "addresses": ["10.8.0.2"]}]},
     "users[1].addresses[0]"),
    ("limits", {"users": [{"user": "u1", "addresses": []}, {"user": "u1", "addresses": []}]}, "users[1].user"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "rate_mbps": 0}]}, "users[0].rate_mbps"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "rate_mbps": 100001}]}, "users[0].rate_mbps"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "rate_mbps": 2.5}]}, "users[0].rate_mbps"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "rate_mbps": True}]}, "users[0].rate_mbps"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "quota": -1}]}, "users[0].quota"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "quota": 10 ** 16}]}, "users[0].quota"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "used": -5}]}, "users[0].used"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "period": "2"}]}, "users[0].period"),
    ("limits", {"users": [{"user": "u1", "addresses": [], "name": "x"}]}, "users[0].name"),
    ("limits", {"users": [], "replace": "yes"}, "replace"),
    ("usage", {"since": {"boot": "x", "taken_at": 1.0}}, "since.boot"),
    ("usage", {"since": {"boot": "0" * 8 + "-0000-0000-0000-" + "0" * 12, "taken_at": -1}}, "since.taken_at"),
    ("usage", {"since": {"boot": "0" * 8 + "-0000-0000-0000-" + "0" * 12}}, "since.taken_at"),
    ("usage", {"fresh": 1}, "fresh"),
    ("usage", {"all": True}, "all"),
])
def test_bad_arguments_name_the_field(cmd, args, field):
    with pytest.raises(Invalid) as info:
        requests.COMMANDS[cmd](args, S)
    assert info.value.field == field


def test_limits_arguments_come_back_normalised():
    s6 = settings(pool6="fd00:8::/64")
    got = requests.COMMANDS["limits"]({"users": [
        {"user": "u1", "addresses": ["10.8.0.2", "FD00:8::0002"], "rate_mbps": 20},
        {"user": "u2", "addresses": [], "quota": 0, "used": 7, "period": 3}], "replace": True}, s6)
    assert got == {"replace": True, "users": {
        "u1": {"addresses": ["10.8.0.2", "fd00:8::2"], "rate_mbps": 20, "quota": None, "used": 0, "period": 0},
        "u2": {"addresses": [], "rate_mbps": None, "quota": 0, "used": 7, "period": 3}}}
    # IPv6 off: an IPv6 address is refused like any address outside the pools.
    with pytest.raises(Invalid):
        requests.COMMANDS["limits"]({"users": [{"user": "u1", "addresses": ["fd00:8::2"]}]}, S)


def test_usage_arguments():
    boot = "12345678-aaaa-bbbb-cccc-1234567890ab"
    assert requests.COMMANDS["usage"]({}, S) == {"since": None, "fresh": False}
    assert requests.COMMANDS["usage"]({"since": {"boot": boot, "taken_at": 12}, "fresh": True}, S) == {
        "since": {"boot": boot, "taken_at": 12.0}, "fresh": True}
