"""The WireGuard interface's lifecycle (wghelper/interface.py): exact argv via the fake runner."""
import threading
import time

import pytest

from wghelper.errors import CommandFailed

from .fakes import FAKE_IF, FAKE_KEYFILE, SERVER_PUBLIC, Helper, key

IF = FAKE_IF
KEYFILE = FAKE_KEYFILE

BRING_UP_TAIL = [
    ["wg", "set", IF, "listen-port", "51820", "private-key", KEYFILE],
    ["ip", "-4", "address", "replace", "10.8.0.1/16", "dev", IF],
    ["ip", "link", "set", "dev", IF, "mtu", "1420", "up"],
    ["ip", "-o", "link", "show", "dev", IF],  # its ifindex: the watcher tells a link made again by it
]


@pytest.fixture
def helper(tmp_path):
    h = Helper(tmp_path).start()
    yield h
    h.writer.stop()


# --- bring-up ---------------------------------------------------------------

def test_bring_up_kernel(tmp_path):
    h = Helper(tmp_path)
    h.iface.up()
    assert h.runner.calls == [
        ["ip", "-o", "link", "show", "dev", IF],
        ["ip", "link", "add", "dev", IF, "type", "wireguard"],
    ] + BRING_UP_TAIL
    assert h.iface.backend == "kernel" and h.iface.running
    assert len(h.iface.generation) == 16
    int(h.iface.generation, 16)


def test_bring_up_dual_stack_gives_the_gateway6(tmp_path):
    h = Helper(tmp_path, pool6="fd00:8::/64")
    h.iface.up()
    assert h.runner.calls[2:] == BRING_UP_TAIL[:2] + [
        ["ip", "-6", "address", "replace", "fd00:8::1/64", "dev", IF]] + BRING_UP_TAIL[2:]


def test_bring_up_falls_back_to_wireguard_go(tmp_path):
    h = Helper(tmp_path, kernel=False)
    h.iface.up()
    assert h.runner.calls == [
        ["ip", "-o", "link", "show", "dev", IF],
        ["ip", "link", "add", "dev", IF, "type", "wireguard"],
        ["wireguard-go", IF],
        ["ip", "-o", "link", "show", "dev", IF],   # waits for the link and its socket
    ] + BRING_UP_TAIL
    assert h.iface.backend == "wireguard-go"


def test_bring_up_userspace_skips_the_kernel(tmp_path):
    h = Helper(tmp_path, kernel=True, wg_backend="userspace")
    h.iface.up()
    assert h.runner.calls[:2] == [["ip", "-o", "link", "show", "dev", IF], ["wireguard-go", IF]]
    assert h.iface.backend == "wireguard-go"


def test_bring_up_kernel_only_does_not_fall_back(tmp_path):
    h = Helper(tmp_path, kernel=False, wg_backend="kernel")
    with pytest.raises(CommandFailed):
        h.iface.up()
    assert ["wireguard-go", IF] not in h.runner.calls
    assert not h.iface.running


def test_other_link_errors_do_not_fall_back(tmp_path):
    h = Helper(tmp_path)
    h.runner.fail = lambda argv: "RTNETLINK answers: Operation not permitted" if argv[2:3] == ["add"] else None
    with pytest.raises(CommandFailed):
        h.iface.up()
    assert ["wireguard-go", IF] not in h.runner.calls


ADOPT = [
    ["ip", "-o", "link", "show", "dev", IF],
    ["wg", "show", IF, "dump"],
    ["ip", "-o", "address", "show", "dev", IF],
    # Not the key or the port: setting a listen port again rebinds wireguard-go's socket.
    ["ip", "-4", "address", "replace", "10.8.0.1/16", "dev", IF],
    ["ip", "link", "set", "dev", IF, "mtu", "1420", "up"],
    ["ip", "-o", "link", "show", "dev", IF],  # its ifindex: the watcher tells a link made again by it
]


def test_bring_up_adopts_our_link_as_it_is(tmp_path):
    h = Helper(tmp_path)
    h.runner.adopted(IF)
    h.runner.peers["K"] = {"allowed_ips": ["10.8.0.2/32"], "endpoint": "192.0.2.9:1", "keepalive": 0}
    h.iface.public_key = SERVER_PUBLIC
    h.iface.up()
    assert h.runner.calls == ADOPT
    assert h.iface.running and h.iface.backend == "kernel" and IF in h.runner.links
    assert "K" in h.runner.peers  # no flush, no delete: the sessions go on


@pytest.mark.parametrize("change, why", [
    (lambda h: setattr(h.iface, "public_key", key(7)), "has another key or listen port"),
    (lambda h: h.runner.adopted(IF, port=40000), "has another key or listen port"),
    (lambda h: h.runner.adopted(IF, address="10.9.0.1/16"), "has another address"),
    (lambda h: (h.runner.keyed.pop(IF), h.runner.link_keys.pop(IF)), "has another key or listen port"),  # never keyed
])
def test_bring_up_recreates_a_link_that_does_not_match(tmp_path, caplog, change, why):
    h = Helper(tmp_path)
    h.runner.adopted(IF)
    h.iface.public_key = SERVER_PUBLIC
    change(h)
    h.iface.up()
    assert ["ip", "link", "del", "dev", IF] in h.runner.calls
    assert h.runner.calls[-5:] == [["ip", "link", "add", "dev", IF, "type", "wireguard"]] + BRING_UP_TAIL
    assert "interface %s %s; re-creating it" % (IF, why) in caplog.text


def test_bring_up_replaces_a_link_wg_cannot_control(tmp_path):
    h = Helper(tmp_path)
    h.runner.links.add(IF)
    h.runner.fail = lambda argv: "Unable to access interface" if argv == ["wg", "show", IF, "dump"] else None
    h.iface.up()
    assert h.runner.calls == [
        ["ip", "-o", "link", "show", "dev", IF],
        ["wg", "show", IF, "dump"],
        ["ip", "link", "del", "dev", IF],
        ["ip", "link", "add", "dev", IF, "type", "wireguard"],
    ] + BRING_UP_TAIL


def test_failed_configuration_leaves_an_adopted_link_alone(tmp_path):
    h = Helper(tmp_path)
    h.runner.adopted(IF)
    h.iface.public_key = SERVER_PUBLIC
    h.runner.fail = lambda argv: "bad mtu" if "mtu" in argv else None
    with pytest.raises(CommandFailed):
        h.iface.up()
    assert IF in h.runner.links and ["ip", "link", "del", "dev", IF] not in h.runner.calls
    assert not h.iface.running


def test_failed_configuration_removes_the_link(tmp_path):
    h = Helper(tmp_path)
    h.runner.fail = lambda argv: "bad mtu" if "mtu" in argv else None
    with pytest.raises(CommandFailed):
        h.iface.up()
    assert h.runner.calls[-2:] == [["ip", "-o", "link", "show", "dev", IF], ["ip", "link", "del", "dev", IF]]
    assert IF not in h.runner.links and not h.iface.running


def test_settings_shape_the_argv(tmp_path):
    h = Helper(tmp_path, pool="10.77.0.0/24", gateway="10.77.0.9", mtu=1280, listen_port=40000)
    h.iface.up()
    assert h.runner.calls[-4:-1] == [
        ["wg", "set", IF, "listen-port", "40000", "private-key", KEYFILE],
        ["ip", "-4", "address", "replace", "10.77.0.9/24", "dev", IF],
        ["ip", "link", "set", "dev", IF, "mtu", "1280", "up"],
    ]


def test_stop_leaves_the_interface(tmp_path):
    h = Helper(tmp_path, kernel=False, helper_watch_interval="0.05").start()
    h.iface.start_watcher()
    h.iface.stop()
    assert h.runner.calls == [] or set(map(tuple, h.runner.calls)) == {("ip", "link", "show", "dev", IF)}
    assert IF in h.runner.links and h.runner.daemons == {IF}
    h.runner.links.discard(IF)
    h.iface.check()  # stopped: the watcher re-creates nothing any more
    assert IF not in h.runner.links
    h.writer.stop()


def test_down_kernel(helper):
    helper.iface.down()
    assert helper.runner.calls == [["ip", "-o", "link", "show", "dev", IF], ["ip", "link", "del", "dev", IF]]
    assert not helper.iface.running


def test_down_wireguard_go(tmp_path):
    h = Helper(tmp_path, kernel=False).start()
    h.iface.down()
    # Deleting the link is what ends the wireguard-go daemon; it is never signalled.
    assert h.runner.calls == [["ip", "-o", "link", "show", "dev", IF], ["ip", "link", "del", "dev", IF]]
    assert h.runner.daemons == set()
    h.writer.stop()


def test_watcher_recreates_a_deleted_link(tmp_path):
    h = Helper(tmp_path).start()
    first = h.iface.generation
    h.iface.check()
    assert h.runner.calls == [["ip", "-o", "link", "show", "dev", IF]]  # healthy: nothing done
    h.runner.links.discard(IF)
    h.runner.clear()
    h.iface.check()
    assert ["ip", "link", "add", "dev", IF, "type", "wireguard"] in h.runner.calls
    assert h.iface.running and h.iface.generation != first
    h.writer.stop()


def test_watcher_restarts_a_dead_wireguard_go(tmp_path):
    h = Helper(tmp_path, kernel=False, helper_watch_interval="0.05").start()
    first = h.iface.generation
    h.iface.start_watcher()
    try:
        h.runner.daemons.discard(IF)  # wireguard-go died, taking its link along
        h.runner.links.discard(IF)
        deadline = time.monotonic() + 5
        while h.iface.generation == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert h.iface.generation != first
        assert h.runner.daemons == {IF} and h.runner.calls.count(["wireguard-go", IF]) == 1
    finally:
        h.iface.down()
        h.writer.stop()
    assert h.runner.daemons == set()


def test_watcher_configures_a_link_made_again_between_two_ticks(tmp_path):
    """A link deleted and made again (a new ifindex) is not the one the helper configured."""
    h = Helper(tmp_path).start()
    first = h.iface.generation
    h.runner.remade(IF)
    h.runner.clear()
    h.iface.check()
    assert ["ip", "link", "del", "dev", IF] in h.runner.calls  # the helper's own link: made afresh
    assert h.runner.calls[-4:-1] == BRING_UP_TAIL[:3]
    assert h.iface.running and h.iface.generation != first
    h.writer.stop()


# --- external backend: the link's own unit makes it ---------------------------

def test_external_waits_for_the_link_and_configures_it(tmp_path):
    h = Helper(tmp_path, kernel=False, wg_backend="external")
    h.iface.public_key = SERVER_PUBLIC
    h.iface.start_timeout = 5
    threading.Timer(0.3, h.runner.remade, (IF,)).start()  # orbmesh-wireguard-go@IF.service, a moment later
    h.iface.up()
    assert not any(c[0] == "wireguard-go" or c[1:3] in (["link", "add"], ["link", "del"]) for c in h.runner.calls)
    assert h.runner.calls[-4:] == BRING_UP_TAIL and h.runner.link_keys[IF] == SERVER_PUBLIC
    assert h.iface.running


def test_external_without_its_link_fails_and_names_the_unit(tmp_path):
    h = Helper(tmp_path, wg_backend="external")
    h.iface.start_timeout = 0.2
    with pytest.raises(CommandFailed, match="orbmesh-wireguard-go@%s.service" % IF):
        h.iface.up()
    assert not h.iface.running and IF not in h.runner.links


def test_external_configures_an_unfit_link_instead_of_deleting_it(tmp_path):
    h = Helper(tmp_path, wg_backend="external")
    h.runner.remade(IF)  # fresh: no key, no address
    h.iface.public_key = SERVER_PUBLIC
    h.iface.up()
    assert ["ip", "link", "del", "dev", IF] not in h.runner.calls
    assert h.runner.calls[-4:] == BRING_UP_TAIL


def test_external_watcher_leaves_a_lost_link_to_its_unit_then_configures_the_new_one(tmp_path):
    h = Helper(tmp_path, wg_backend="external")
    h.iface.public_key = SERVER_PUBLIC
    h.runner.remade(IF)
    h.iface.up()
    first = h.iface.generation
    h.runner.links.discard(IF)  # wireguard-go died
    h.runner.clear()
    h.iface.check()
    assert h.runner.calls == [["ip", "-o", "link", "show", "dev", IF]] and not h.iface.running
    h.runner.remade(IF)  # its unit started it again
    h.iface.check()
    assert h.runner.calls[-4:] == BRING_UP_TAIL and h.iface.running and h.iface.generation != first
    assert not any(c[1:3] in (["link", "add"], ["link", "del"]) for c in h.runner.calls)


def test_external_down_deletes_the_link(tmp_path):
    h = Helper(tmp_path, wg_backend="external")
    h.runner.remade(IF)
    h.iface.up()
    h.runner.clear()
    h.iface.down()
    assert h.runner.calls == [["ip", "-o", "link", "show", "dev", IF], ["ip", "link", "del", "dev", IF]]


def test_down_raises_while_the_link_stays(helper):
    """`orbmesh-wghelper down` must not go on to delete the table that guards a link still there."""
    helper.runner.fail = lambda argv: "RTNETLINK answers: Operation not permitted" if argv[1:3] == ["link", "del"] \
        else None
    with pytest.raises(CommandFailed):
        helper.iface.down()
    assert IF in helper.runner.links and not helper.iface.running
    helper.runner.fail = None  # control
    helper.iface.down()
    assert IF not in helper.runner.links


def test_down_of_a_link_gone_meanwhile_succeeds(helper):
    def fail(argv):
        if argv[1:3] == ["link", "del"]:  # a wireguard-go daemon exited between the check and the delete
            helper.runner.links.discard(IF)
            return "Cannot find device \"%s\"" % IF
        return None

    helper.runner.fail = fail
    helper.iface.down()
    assert IF not in helper.runner.links
