"""The command table both sides share (wghelper/requests.py): names, and what each command's arguments may be."""
import pytest

from wghelper import requests
from wghelper.errors import Invalid
from wghelper.handlers import HANDLERS

from .fakes import key, peer, settings

S = settings(bridge_networks="10.9.0.0/16")


def test_every_command_has_a_handler_and_nothing_else_is_served():
    assert set(requests.COMMANDS) == set(HANDLERS) == {
        "hello", "status", "apply_peers", "dump_peers", "sync_peers", "bridge_up", "bridge_down", "bridge_rules"}


def test_arguments_come_back_normalised():
    assert requests.COMMANDS["apply_peers"]({"add": [peer(key(1), endpoint="[2001:DB8::1]:7")]}, S) == {
        "remove": [], "add": [{"public_key": key(1), "allowed_ips": ["10.8.0.2/32"],
                               "endpoint": "[2001:db8::1]:7", "keepalive": 0, "last_endpoint": None}]}
    assert requests.COMMANDS["bridge_rules"]({"add": [{"address": "10.8.0.2", "slot": 3}]}, S) == {
        "add": {"10.8.0.2": 3}, "remove": [], "exclusive": False}
    assert requests.COMMANDS["bridge_up"]({"slot": 1, "public_key": key(9), "endpoint": "198.51.100.1:51820",
                                           "address": "10.9.255.1"}, S)["keepalive"] == 25


@pytest.mark.parametrize("cmd, args, field", [
    ("hello", {"x": 1}, "x"),
    ("status", {"verbose": True}, "verbose"),
    ("dump_peers", {"all": True}, "all"),
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
])
def test_bad_arguments_name_the_field(cmd, args, field):
    with pytest.raises(Invalid) as info:
        requests.COMMANDS[cmd](args, S)
    assert info.value.field == field
