"""The commands (wghelper/handlers.py) through dispatch: replies and the exact argv, via the fake runner."""
import json
import time

import pytest

from wghelper import protocol
from wghelper.peers import RESTORE_KEEPALIVE

from wghelper.bridge import Bridges

from .fakes import BRIDGE_KEYFILE, BRIDGE_PUBLIC, DUMP_PRIVATE, FAKE_IF, SERVER_PUBLIC, Helper, key, peer

IF = FAKE_IF
K1, K2, K3 = key(1), key(2), key(3)


@pytest.fixture
def helper(tmp_path):
    h = Helper(tmp_path).start()
    yield h
    h.writer.stop()


def add(helper, *peers):
    return helper.result("apply_peers", {"add": list(peers)})


# --- peer changes -------------------------------------------------------------

def test_add_argv(helper):
    assert add(helper, peer(K1, "10.8.0.2/32", endpoint="192.0.2.1:51820", keepalive=25),
               peer(K2, "10.8.0.3/32", "10.8.0.4/32")) == {"removed": 0, "applied": 2}
    assert helper.runner.calls == [[
        "wg", "set", IF,
        "peer", K1, "allowed-ips", "10.8.0.2/32", "endpoint", "192.0.2.1:51820", "persistent-keepalive", "25",
        "peer", K2, "allowed-ips", "10.8.0.3/32,10.8.0.4/32", "persistent-keepalive", "0",
    ]]


@pytest.mark.parametrize("own", [SERVER_PUBLIC, BRIDGE_PUBLIC, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="])
def test_the_helpers_own_keys_and_low_order_points_are_refused(tmp_path, own):
    """The server's own key as a client's left the database and the interface apart for good."""
    h = Helper(tmp_path, bridge_networks="10.9.0.0/16").start()
    try:
        h.ctx.bridges = Bridges(h.settings, h.cmd, None, BRIDGE_KEYFILE, BRIDGE_PUBLIC)
        for cmd, args, field in [("apply_peers", {"add": [peer(K1), peer(own, "10.8.0.3/32")]}, "add[1].public_key"),
                                 ("sync_peers", {"peers": [peer(own)]}, "peers[0].public_key"),
                                 ("bridge_up", {"slot": 1, "public_key": own, "endpoint": "192.0.2.1:1",
                                                "address": "10.9.0.2"}, "public_key")]:
            reply = h.call(cmd, args)
            assert reply["error"]["code"] == "INVALID_ARGUMENT" and reply["error"]["details"]["field"] == field
        assert h.runner.calls == []
        assert add(h, peer(K1)) == {"removed": 0, "applied": 1}  # control
    finally:
        h.writer.stop()


def test_update_can_turn_keepalive_off(helper):
    add(helper, peer(K1, keepalive=25))
    add(helper, peer(K1, "10.8.0.9/32", keepalive=0))
    assert helper.runner.calls[-1] == [
        "wg", "set", IF, "peer", K1, "allowed-ips", "10.8.0.9/32", "persistent-keepalive", "0"]
    assert helper.runner.peers[K1]["keepalive"] == 0


def test_endpoint_is_normalised_in_the_argv(helper):
    add(helper, peer(K1, endpoint="[2001:DB8:0::1]:7"))
    assert helper.runner.calls[-1][-4:] == ["endpoint", "[2001:db8::1]:7", "persistent-keepalive", "0"]


def test_remove_argv(helper):
    assert helper.result("apply_peers", {"remove": [K1, K2]}) == {"removed": 2, "applied": 0}
    assert helper.runner.calls == [["wg", "set", IF, "peer", K1, "remove", "peer", K2, "remove"]]


def test_apply_removes_before_adding(helper):
    assert helper.result("apply_peers", {"remove": [K1], "add": [peer(K2, "10.8.0.2/32")]}) == {
        "removed": 1, "applied": 1}
    assert helper.runner.calls == [[
        "wg", "set", IF, "peer", K1, "remove",
        "peer", K2, "allowed-ips", "10.8.0.2/32", "persistent-keepalive", "0"]]


def test_apply_argument_checks(helper):
    for args in ({}, {"remove": [], "add": []}, {"remove": [K1], "add": [peer(K1)]},
                 {"remove": [K1], "extra": 1}):
        reply = helper.call("apply_peers", args)
        assert reply["error"]["code"] == protocol.INVALID_ARGUMENT, args
    assert helper.runner.calls == []


def test_large_batches_are_chunked(tmp_path):
    h = Helper(tmp_path).start()
    peers = [peer(key(i), "10.8.%d.%d/32" % (i // 250, i % 250 + 2)) for i in range(1, 2501)]
    assert h.result("apply_peers", {"add": peers}) == {"removed": 0, "applied": 2500}
    sets = h.runner.wg_sets()
    assert [c.count("peer") for c in sets] == [1000, 1000, 500]
    assert h.result("status")["wg_set_calls"] == 1  # one job, split into three argvs
    h.writer.stop()


def test_sync_applies_only_the_difference(helper):
    add(helper, 
        peer(K1, "10.8.0.2/32", endpoint="192.0.2.1:1", keepalive=25),   # kept as is
        peer(K2, "10.8.0.3/32"),                                          # wrong address
        peer(key(9), "10.8.0.9/32"),                                      # unknown: removed
    )
    helper.runner.clear()
    result = helper.result("sync_peers", {"peers": [
        peer(K1, "10.8.0.2/32", keepalive=25),   # no endpoint wanted: the roamed one stays
        peer(K2, "10.8.0.4/32"),
        peer(K3, "10.8.0.5/32", endpoint="192.0.2.7:9", keepalive=5),
    ]})
    # K1's endpoint is reported: the app keeps it as the peer's last endpoint.
    assert result == {"added": 1, "removed": 1, "updated": 1, "kept": 0, "endpoints": {K1: "192.0.2.1:1"}}
    assert helper.runner.calls == [
        ["wg", "show", IF, "dump"],
        ["wg", "set", IF,
         "peer", key(9), "remove",
         # A peer with an endpoint first (test_sync_adds_the_peers_with_an_endpoint_first).
         "peer", K3, "allowed-ips", "10.8.0.5/32", "endpoint", "192.0.2.7:9", "persistent-keepalive", "5",
         "peer", K2, "allowed-ips", "10.8.0.4/32", "persistent-keepalive", "0"],
    ]
    # A second sync finds nothing to do and runs no wg set at all.
    helper.runner.clear()
    again = helper.result("sync_peers", {"peers": [
        peer(K1, "10.8.0.2/32", keepalive=25, last_endpoint="192.0.2.1:1"), peer(K2, "10.8.0.4/32"),
        peer(K3, "10.8.0.5/32", endpoint="192.0.2.7:9", keepalive=5, last_endpoint="192.0.2.7:9")]})
    assert again == {"added": 0, "removed": 0, "updated": 0, "kept": 0,
                     "endpoints": {K1: "192.0.2.1:1", K3: "192.0.2.7:9"}}
    assert helper.runner.calls == [["wg", "show", IF, "dump"]]


def test_sync_fixes_endpoint_and_keepalive():
    from wghelper.peers import plan_sync

    current = [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": "192.0.2.1:1", "keepalive": 0},
               {"public_key": K2, "allowed_ips": ["10.8.0.3/32"], "endpoint": None, "keepalive": 25}]
    desired = [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": "192.0.2.1:2", "keepalive": 0},
               {"public_key": K2, "allowed_ips": ["10.8.0.3/32"], "endpoint": None, "keepalive": 0}]
    removes, adds, counts = plan_sync(current, desired)
    assert removes == [] and adds == desired
    assert counts == {"added": 0, "removed": 0, "updated": 2, "kept": 0, "endpoints": {K1: "192.0.2.1:1"}}


def test_sync_adds_the_peers_with_an_endpoint_first():
    """After the interface was lost the sync goes back in slices of 1,000: the peers seen lately (a
    stored endpoint) or given one come first, idle ones after, each group in the order asked."""
    from wghelper.peers import plan_sync

    desired = [{"public_key": key(i), "allowed_ips": ["10.8.1.%d/32" % i], "endpoint": None, "keepalive": 0,
                "last_endpoint": "192.0.2.%d:5" % i if i % 3 == 0 else None} for i in range(1, 10)]
    desired[1]["endpoint"] = "198.51.100.2:7"
    _, adds, counts = plan_sync([], desired)
    assert [p["public_key"] for p in adds] == [key(i) for i in (2, 3, 6, 9, 1, 4, 5, 7, 8)]
    assert counts["added"] == 9


def test_sync_puts_a_lost_peer_back_to_its_last_endpoint(helper):
    """The interface lost K1 (re-created): it goes back to where it was last seen, with a keepalive, so
    the server starts the handshake; K2, still live and roamed, keeps its roamed endpoint and keepalive."""
    add(helper, peer(K2, "10.8.0.3/32", endpoint="198.51.100.9:4000"))
    helper.runner.clear()
    result = helper.result("sync_peers", {"peers": [
        peer(K1, "10.8.0.2/32", last_endpoint="192.0.2.50:1234"),
        peer(K2, "10.8.0.3/32", last_endpoint="192.0.2.51:999"),   # recorded before it roamed
        peer(K3, "10.8.0.4/32", endpoint="192.0.2.7:9", keepalive=5, last_endpoint="192.0.2.8:1"),
    ]})
    assert result == {"added": 2, "removed": 0, "updated": 0, "kept": 0, "endpoints": {K2: "198.51.100.9:4000"}}
    assert helper.runner.wg_sets() == [
        ["wg", "set", IF,
         "peer", K1, "allowed-ips", "10.8.0.2/32", "endpoint", "192.0.2.50:1234",
         "persistent-keepalive", str(RESTORE_KEEPALIVE),
         # An endpoint of its own (OrbNET's add-peer) wins over the last one seen.
         "peer", K3, "allowed-ips", "10.8.0.4/32", "endpoint", "192.0.2.7:9", "persistent-keepalive", "5"]]
    assert helper.runner.peers[K2]["endpoint"] == "198.51.100.9:4000"
    # The next sync sets K1's own keepalive (0) again and leaves its endpoint alone.
    helper.runner.clear()
    helper.result("sync_peers", {"peers": [peer(K1, "10.8.0.2/32", last_endpoint="192.0.2.50:1234"),
                                           peer(K2, "10.8.0.3/32"),
                                           peer(K3, "10.8.0.4/32", endpoint="192.0.2.7:9", keepalive=5)]})
    assert helper.runner.wg_sets() == [
        ["wg", "set", IF, "peer", K1, "allowed-ips", "10.8.0.2/32", "persistent-keepalive", "0"]]
    assert helper.runner.peers[K1]["endpoint"] == "192.0.2.50:1234"


def test_sync_empty_set_removes_everything(helper):
    add(helper, peer(K1), peer(K2, "10.8.0.3/32"))
    assert helper.result("sync_peers", {"peers": []}) == {"added": 0, "removed": 2, "updated": 0, "kept": 0,
                                                          "endpoints": {}}
    assert helper.runner.peers == {}


def test_a_sync_leaves_alone_what_an_apply_changed_after_its_rows_were_read(helper):
    """A reconcile read its rows at `since`; a connect (K2) and a disconnect (K1) committed after that
    and reached the interface before the sync did.  The sync neither takes K2 off nor puts K1 back; the
    change it was read for (K3, stale) still goes.  The control: a sync read after them does its all."""
    add(helper, peer(K1), peer(K3, "10.8.0.4/32"))
    since = time.monotonic()
    add(helper, peer(K2, "10.8.0.3/32"))
    assert helper.result("apply_peers", {"remove": [K1]}) == {"removed": 1, "applied": 0}
    helper.runner.clear()
    result = helper.result("sync_peers", {"peers": [peer(K1)], "since": since})
    assert (result["removed"], result["added"], result["kept"]) == (1, 0, 2)
    assert helper.runner.wg_sets() == [["wg", "set", IF, "peer", K3, "remove"]]
    assert set(helper.runner.peers) == {K2}
    late = helper.result("sync_peers", {"peers": [peer(K1)], "since": time.monotonic()})
    assert (late["removed"], late["added"], late["kept"]) == (1, 1, 0)
    assert set(helper.runner.peers) == {K1}


def test_a_sync_puts_back_what_a_later_apply_did_on_an_interface_since_lost():
    """The interface was made again between the apply and the sync: the key the apply added is not on it,
    the one it removed is, so the sync does its all (a kept key would stay off until the next drift check)."""
    from wghelper.peers import plan_sync

    current = [{"public_key": K2, "allowed_ips": ["10.8.0.3/32"], "endpoint": None, "keepalive": 0}]
    desired = [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": None, "keepalive": 0}]
    removes, adds, counts = plan_sync(current, desired, {K1: True, K2: False})
    assert removes == [K2] and adds == desired and counts["kept"] == 0
    # The control: the interface shows what the applies did, and both keys stay as they are.
    assert plan_sync([dict(current[0], public_key=K1)], [], {K1: True, K2: False})[:2] == ([], [])


@pytest.mark.parametrize("since", [-1, "5", True, float("nan"), float("inf"), 2 ** 53, [1]])
def test_a_sync_refuses_a_since_that_is_not_a_clock_reading(helper, since):
    add(helper, peer(K1))
    helper.runner.clear()
    reply = helper.call("sync_peers", {"peers": [], "since": since})
    assert reply["error"]["code"] == protocol.INVALID_ARGUMENT and reply["error"]["details"]["field"] == "since"
    assert helper.runner.wg_sets() == [] and set(helper.runner.peers) == {K1}


def test_dump_and_status_never_return_the_private_key(helper):
    add(helper, peer(K1, endpoint="192.0.2.1:1", keepalive=25))
    dump = helper.result("dump_peers")
    assert dump == {"peers": [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": "192.0.2.1:1",
                               "latest_handshake": 0, "rx_bytes": 100, "tx_bytes": 200, "keepalive": 25}]}
    status = helper.result("status")
    assert status["public_key"] == SERVER_PUBLIC
    assert (status["peer_count"], status["rx_bytes"], status["tx_bytes"]) == (1, 100, 200)
    assert status["backend"] == "kernel" and status["running"] is True
    for text in (json.dumps(dump), json.dumps(status)):
        assert DUMP_PRIVATE not in text


def test_a_dump_is_walked_a_page_at_a_time_by_key_from_one_wg_show(helper):
    keys = [key(n) for n in range(1, 8)]
    add(helper, *[peer(k, "10.8.0.%d/32" % (n + 2)) for n, k in enumerate(keys)])
    helper.runner.clear()
    first = helper.result("dump_peers", {"limit": 3})
    pages, offset = [first], 3
    while offset < first["total"]:
        pages.append(helper.result("dump_peers", {"dump": first["dump"], "offset": offset, "limit": 3}))
        offset += 3
    assert [p["total"] for p in pages] == [7, 7, 7] and [len(p["peers"]) for p in pages] == [3, 3, 1]
    assert [p["public_key"] for page in pages for p in page["peers"]] == sorted(keys)
    assert helper.runner.calls == [["wg", "show", IF, "dump"]]
    # The last page let the dump go.
    reply = helper.call("dump_peers", {"dump": first["dump"], "offset": 0, "limit": 3})
    assert reply["error"]["code"] == protocol.INVALID_ARGUMENT and reply["error"]["details"]["field"] == "dump"


def test_two_walks_may_overlap_and_a_third_drops_the_oldest(helper):
    add(helper, peer(K1), peer(K2, "10.8.0.3/32"))
    first, second, third = (helper.result("dump_peers", {"limit": 1}) for _ in range(3))
    assert len({first["dump"], second["dump"], third["dump"]}) == 3
    reply = helper.call("dump_peers", {"dump": first["dump"], "offset": 1, "limit": 1})
    assert reply["error"]["code"] == protocol.INVALID_ARGUMENT and reply["error"]["details"]["field"] == "dump"
    for walk in (second, third):
        assert helper.result("dump_peers", {"dump": walk["dump"], "offset": 1, "limit": 1})["peers"][0][
            "public_key"] == sorted([K1, K2])[1]


def test_hello_runs_no_command(helper):
    result = helper.result("hello")
    assert result == {"generation": helper.iface.generation, "interface": IF, "public_key": SERVER_PUBLIC,
                      "backend": "kernel", "running": True, "listen_port": 51820, "mtu": 1420,
                      "pool": "10.8.0.0/16", "gateway": "10.8.0.1", "pool6": None, "gateway6": None,
                      "ipv6": "off", "bridge_public_key": None, "bridges": []}
    assert helper.runner.calls == []


def test_dual_stack_hello_and_peers(tmp_path):
    """hello announces pool6 and gateway6 (gateway's offset); peers may hold /128s inside pool6."""
    h = Helper(tmp_path, pool="10.9.0.0/24", gateway="10.9.0.9", pool6="2001:db8:9::/120").start()
    try:
        hello = h.result("hello")
        assert (hello["pool6"], hello["gateway6"]) == ("2001:db8:9::/120", "2001:db8:9::9")
        assert add(h, peer(K1, "10.9.0.2/32", "2001:db8:9::2/128")) == {"removed": 0, "applied": 1}
        assert h.runner.calls[-1][-4:] == ["allowed-ips", "10.9.0.2/32,2001:db8:9::2/128", "persistent-keepalive", "0"]
        h.runner.clear()
        for bad in ("2001:db8:9::/120", "2001:db8:9::9/128", "2001:db8:9::100/128", "fd00::2/128"):
            reply = h.call("apply_peers", {"add": [peer(K2, "10.9.0.3/32", bad)]})
            assert reply["error"]["code"] == protocol.INVALID_ARGUMENT, bad
            assert reply["error"]["details"] == {"field": "add[0].allowed_ips[1]"}
        assert h.runner.calls == []
    finally:
        h.writer.stop()


def test_hello_names_the_ipv6_mode_and_local_takes_no_128(tmp_path):
    """In mode "local" (no IPv6 forwarding, wghelper/ipv6.py) the interface keeps gateway6, but no peer may
    hold a /128: an app that has not seen this helper's start yet is refused rather than black-holing a
    client's IPv6."""
    h = Helper(tmp_path, pool="10.9.0.0/24", gateway="10.9.0.9", pool6="2001:db8:9::/120").start()
    try:
        assert h.result("hello")["ipv6"] == "forward"  # what __main__ decided: none, as here, is forward
        h.settings["IPV6_MODE"] = "local"  # as __main__ sets it at start
        hello = h.result("hello")
        assert (hello["ipv6"], hello["pool6"], hello["gateway6"]) == ("local", "2001:db8:9::/120", "2001:db8:9::9")
        assert h.result("status")["ipv6"] == "local"
        h.runner.clear()
        reply = h.call("apply_peers", {"add": [peer(K1, "10.9.0.2/32", "2001:db8:9::2/128")]})
        assert reply["error"]["code"] == protocol.INVALID_ARGUMENT
        assert reply["error"]["details"] == {"field": "add[0].allowed_ips[1]"}
        reply = h.call("sync_peers", {"peers": [peer(K1, "10.9.0.2/32", "2001:db8:9::2/128")]})
        assert reply["error"]["code"] == protocol.INVALID_ARGUMENT and h.runner.wg_sets() == []
        # Control: the same peer with its /32 alone goes on.
        assert add(h, peer(K1, "10.9.0.2/32")) == {"removed": 0, "applied": 1}
        assert h.runner.peers[K1]["allowed_ips"] == ["10.9.0.2/32"]
    finally:
        h.writer.stop()


def test_interface_down(helper):
    helper.iface.running = False
    for cmd, args in (("apply_peers", {"add": [peer(K1)]}), ("status", {}), ("dump_peers", {}),
                      ("sync_peers", {"peers": []}), ("apply_peers", {"remove": [K1]})):
        assert helper.call(cmd, args)["error"]["code"] == protocol.INTERFACE_DOWN
    assert helper.runner.calls == []
    assert helper.result("hello")["running"] is False


def test_vanished_link_is_interface_down_not_command_failed(helper):
    helper.runner.links.discard(IF)  # gone, and the watcher has not noticed yet
    assert helper.call("apply_peers", {"add": [peer(K1)]})["error"]["code"] == protocol.INTERFACE_DOWN
    assert helper.call("sync_peers", {"peers": []})["error"]["code"] == protocol.INTERFACE_DOWN


def test_wg_failure_is_command_failed(helper):
    helper.runner.fail = lambda argv: "Invalid AllowedIP" if argv[:2] == ["wg", "set"] else None
    reply = helper.call("apply_peers", {"add": [peer(K1)]})
    assert reply["error"] == {"code": protocol.COMMAND_FAILED, "message": "wg failed",
                              "details": {"command": "wg", "exit_code": 1, "stderr": "Invalid AllowedIP"}}


def test_invalid_arguments_run_nothing(helper):
    for cmd, args in (("apply_peers", {}), ("apply_peers", {"add": []}),
                      ("apply_peers", {"add": [peer(K1, "10.9.0.1/32")]}),
                      ("apply_peers", {"add": [peer(K1)], "force": True}),
                      ("apply_peers", {"remove": ["nope"]}),
                      ("sync_peers", {"peers": [peer(K1), peer(K1, "10.8.0.3/32")]}),
                      ("hello", {"x": 1}), ("status", {"verbose": True})):
        reply = helper.call(cmd, args)
        assert reply["error"]["code"] == protocol.INVALID_ARGUMENT, (cmd, args)
        assert "field" in reply["error"]["details"]
    assert helper.runner.calls == []
