"""The exact argv the helper runs, through a fake runner (no real wg or ip)."""
import base64
import json
import os
import stat
import threading
import time

import pytest

from wghelper import keys, protocol
from wghelper.commands import CommandFailed, Runner, clean_stderr
from wghelper.handlers import Context, plan_sync
from wghelper.interface import Interface
from wghelper.writer import Writer

from .fakes import (DUMP_PRIVATE, FAKE_IF, FAKE_KEYFILE, SERVER_PUBLIC, FakeRunner, Helper,
                             key, peer)

IF = FAKE_IF
KEYFILE = FAKE_KEYFILE
K1, K2, K3 = key(1), key(2), key(3)

BRING_UP_TAIL = [
    ["wg", "set", IF, "listen-port", "51820", "private-key", KEYFILE],
    ["ip", "-4", "address", "replace", "10.8.0.1/16", "dev", IF],
    ["ip", "link", "set", "dev", IF, "mtu", "1420", "up"],
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
        ["ip", "link", "show", "dev", IF],
        ["ip", "link", "add", "dev", IF, "type", "wireguard"],
    ] + BRING_UP_TAIL
    assert h.iface.backend == "kernel" and h.iface.running
    assert len(h.iface.generation) == 16
    int(h.iface.generation, 16)


def test_bring_up_falls_back_to_wireguard_go(tmp_path):
    h = Helper(tmp_path, kernel=False)
    h.iface.up()
    assert h.runner.calls == [
        ["ip", "link", "show", "dev", IF],
        ["ip", "link", "add", "dev", IF, "type", "wireguard"],
        ["wireguard-go", IF],
        ["ip", "link", "show", "dev", IF],   # waits for the link and its socket
    ] + BRING_UP_TAIL
    assert h.iface.backend == "wireguard-go"


def test_bring_up_userspace_skips_the_kernel(tmp_path):
    h = Helper(tmp_path, kernel=True, wg_backend="userspace")
    h.iface.up()
    assert h.runner.calls[:2] == [["ip", "link", "show", "dev", IF], ["wireguard-go", IF]]
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


def test_bring_up_reuses_a_working_link(tmp_path):
    h = Helper(tmp_path)
    h.runner.links.add(IF)
    h.iface.up()
    assert h.runner.calls == [["ip", "link", "show", "dev", IF], ["wg", "show", IF]] + BRING_UP_TAIL


def test_bring_up_replaces_a_link_wg_cannot_control(tmp_path):
    h = Helper(tmp_path)
    h.runner.links.add(IF)
    h.runner.fail = lambda argv: "Unable to access interface" if argv == ["wg", "show", IF] else None
    h.iface.up()
    assert h.runner.calls == [
        ["ip", "link", "show", "dev", IF],
        ["wg", "show", IF],
        ["ip", "link", "del", "dev", IF],
        ["ip", "link", "add", "dev", IF, "type", "wireguard"],
    ] + BRING_UP_TAIL


def test_failed_configuration_removes_the_link(tmp_path):
    h = Helper(tmp_path)
    h.runner.fail = lambda argv: "bad mtu" if "mtu" in argv else None
    with pytest.raises(CommandFailed):
        h.iface.up()
    assert h.runner.calls[-2:] == [["ip", "link", "show", "dev", IF], ["ip", "link", "del", "dev", IF]]
    assert IF not in h.runner.links and not h.iface.running


def test_settings_shape_the_argv(tmp_path):
    h = Helper(tmp_path, pool="10.77.0.0/24", gateway="10.77.0.9", mtu=1280, listen_port=40000)
    h.iface.up()
    assert h.runner.calls[-3:] == [
        ["wg", "set", IF, "listen-port", "40000", "private-key", KEYFILE],
        ["ip", "-4", "address", "replace", "10.77.0.9/24", "dev", IF],
        ["ip", "link", "set", "dev", IF, "mtu", "1280", "up"],
    ]


def test_down_kernel(helper):
    helper.iface.down()
    assert helper.runner.calls == [["ip", "link", "show", "dev", IF], ["ip", "link", "del", "dev", IF]]
    assert not helper.iface.running


def test_down_wireguard_go(tmp_path):
    h = Helper(tmp_path, kernel=False).start()
    h.iface.down()
    assert h.runner.calls == [["stop-wireguard-go", IF], ["ip", "link", "show", "dev", IF]]
    h.writer.stop()


def test_watcher_recreates_a_deleted_link(tmp_path):
    h = Helper(tmp_path).start()
    first = h.iface.generation
    h.iface.check()
    assert h.runner.calls == [["ip", "link", "show", "dev", IF]]  # healthy: nothing done
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
        h.runner.children[0].running = False  # wireguard-go died, taking its link along
        h.runner.links.discard(IF)
        deadline = time.monotonic() + 5
        while h.iface.generation == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert h.iface.generation != first
        assert len(h.runner.children) == 2 and h.runner.children[1].running
        calls = h.runner.calls
        assert calls.index(["stop-wireguard-go", IF]) < calls.index(["wireguard-go", IF])
    finally:
        h.iface.down()
        h.writer.stop()
    assert not h.runner.children[1].running


# --- peer changes -------------------------------------------------------------

def test_add_argv(helper):
    assert helper.result("add_peers", {"peers": [
        peer(K1, "10.8.0.2/32", endpoint="192.0.2.1:51820", keepalive=25),
        peer(K2, "10.8.0.3/32", "10.8.0.4/32"),
    ]}) == {"applied": 2}
    assert helper.runner.calls == [[
        "wg", "set", IF,
        "peer", K1, "allowed-ips", "10.8.0.2/32", "endpoint", "192.0.2.1:51820", "persistent-keepalive", "25",
        "peer", K2, "allowed-ips", "10.8.0.3/32,10.8.0.4/32", "persistent-keepalive", "0",
    ]]


def test_update_can_turn_keepalive_off(helper):
    helper.result("add_peers", {"peers": [peer(K1, keepalive=25)]})
    helper.result("add_peers", {"peers": [peer(K1, "10.8.0.9/32", keepalive=0)]})
    assert helper.runner.calls[-1] == [
        "wg", "set", IF, "peer", K1, "allowed-ips", "10.8.0.9/32", "persistent-keepalive", "0"]
    assert helper.runner.peers[K1]["keepalive"] == 0


def test_endpoint_is_normalised_in_the_argv(helper):
    helper.result("add_peers", {"peers": [peer(K1, endpoint="[2001:DB8:0::1]:7")]})
    assert helper.runner.calls[-1][-4:] == ["endpoint", "[2001:db8::1]:7", "persistent-keepalive", "0"]


def test_remove_argv(helper):
    assert helper.result("remove_peers", {"public_keys": [K1, K2]}) == {"removed": 2}
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
    h = Helper(tmp_path, chunk=1000).start()
    peers = [peer(key(i), "10.8.%d.%d/32" % (i // 250, i % 250 + 2)) for i in range(1, 2501)]
    assert h.result("add_peers", {"peers": peers}) == {"applied": 2500}
    sets = h.runner.wg_sets()
    assert [c.count("peer") for c in sets] == [1000, 1000, 500]
    assert h.result("status")["wg_set_calls"] == 3
    h.writer.stop()


def test_sync_applies_only_the_difference(helper):
    helper.result("add_peers", {"peers": [
        peer(K1, "10.8.0.2/32", endpoint="192.0.2.1:1", keepalive=25),   # kept as is
        peer(K2, "10.8.0.3/32"),                                          # wrong address
        peer(key(9), "10.8.0.9/32"),                                      # unknown: removed
    ]})
    helper.runner.clear()
    result = helper.result("sync_peers", {"peers": [
        peer(K1, "10.8.0.2/32", keepalive=25),   # no endpoint wanted: the roamed one stays
        peer(K2, "10.8.0.4/32"),
        peer(K3, "10.8.0.5/32", endpoint="192.0.2.7:9", keepalive=5),
    ]})
    assert result == {"added": 1, "removed": 1, "updated": 1}
    assert helper.runner.calls == [
        ["wg", "show", IF, "dump"],
        ["wg", "set", IF,
         "peer", key(9), "remove",
         "peer", K2, "allowed-ips", "10.8.0.4/32", "persistent-keepalive", "0",
         "peer", K3, "allowed-ips", "10.8.0.5/32", "endpoint", "192.0.2.7:9", "persistent-keepalive", "5"],
    ]
    # A second sync finds nothing to do and runs no wg set at all.
    helper.runner.clear()
    again = helper.result("sync_peers", {"peers": [
        peer(K1, "10.8.0.2/32", keepalive=25), peer(K2, "10.8.0.4/32"),
        peer(K3, "10.8.0.5/32", endpoint="192.0.2.7:9", keepalive=5)]})
    assert again == {"added": 0, "removed": 0, "updated": 0}
    assert helper.runner.calls == [["wg", "show", IF, "dump"]]


def test_sync_fixes_endpoint_and_keepalive():
    current = [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": "192.0.2.1:1", "keepalive": 0},
               {"public_key": K2, "allowed_ips": ["10.8.0.3/32"], "endpoint": None, "keepalive": 25}]
    desired = [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": "192.0.2.1:2", "keepalive": 0},
               {"public_key": K2, "allowed_ips": ["10.8.0.3/32"], "endpoint": None, "keepalive": 0}]
    removes, adds, counts = plan_sync(current, desired)
    assert removes == [] and adds == desired
    assert counts == {"added": 0, "removed": 0, "updated": 2}


def test_sync_empty_set_removes_everything(helper):
    helper.result("add_peers", {"peers": [peer(K1), peer(K2, "10.8.0.3/32")]})
    assert helper.result("sync_peers", {"peers": []}) == {"added": 0, "removed": 2, "updated": 0}
    assert helper.runner.peers == {}


def test_dump_and_status_never_return_the_private_key(helper):
    helper.result("add_peers", {"peers": [peer(K1, endpoint="192.0.2.1:1", keepalive=25)]})
    dump = helper.result("dump_peers")
    assert dump == {"peers": [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": "192.0.2.1:1",
                               "latest_handshake": 0, "rx_bytes": 100, "tx_bytes": 200, "keepalive": 25}]}
    status = helper.result("status")
    assert status["public_key"] == SERVER_PUBLIC
    assert (status["peer_count"], status["rx_bytes"], status["tx_bytes"]) == (1, 100, 200)
    assert status["backend"] == "kernel" and status["running"] is True
    for text in (json.dumps(dump), json.dumps(status)):
        assert DUMP_PRIVATE not in text


def test_hello_runs_no_command(helper):
    result = helper.result("hello")
    assert result == {"generation": helper.iface.generation, "interface": IF, "public_key": SERVER_PUBLIC,
                      "backend": "kernel", "running": True, "listen_port": 51820, "mtu": 1420,
                      "pool": "10.8.0.0/16", "gateway": "10.8.0.1", "bridge_public_key": None,
                      "bridges": []}
    assert helper.runner.calls == []


def test_interface_down(helper):
    helper.iface.running = False
    for cmd, args in (("add_peers", {"peers": [peer(K1)]}), ("status", {}), ("dump_peers", {}),
                      ("sync_peers", {"peers": []}), ("remove_peers", {"public_keys": [K1]})):
        assert helper.call(cmd, args)["error"]["code"] == protocol.INTERFACE_DOWN
    assert helper.runner.calls == []
    assert helper.result("hello")["running"] is False


def test_vanished_link_is_interface_down_not_command_failed(helper):
    helper.runner.links.discard(IF)  # gone, and the watcher has not noticed yet
    assert helper.call("add_peers", {"peers": [peer(K1)]})["error"]["code"] == protocol.INTERFACE_DOWN
    assert helper.call("sync_peers", {"peers": []})["error"]["code"] == protocol.INTERFACE_DOWN


def test_wg_failure_is_command_failed(helper):
    helper.runner.fail = lambda argv: "Invalid AllowedIP" if argv[:2] == ["wg", "set"] else None
    reply = helper.call("add_peers", {"peers": [peer(K1)]})
    assert reply["error"] == {"code": protocol.COMMAND_FAILED, "message": "wg failed",
                              "details": {"command": "wg", "exit_code": 1, "stderr": "Invalid AllowedIP"}}


def test_invalid_arguments_run_nothing(helper):
    for cmd, args in (("add_peers", {}), ("add_peers", {"peers": []}),
                      ("add_peers", {"peers": [peer(K1, "10.9.0.1/32")]}),
                      ("add_peers", {"peers": [peer(K1)], "force": True}),
                      ("remove_peers", {"public_keys": ["nope"]}),
                      ("sync_peers", {"peers": [peer(K1), peer(K1, "10.8.0.3/32")]}),
                      ("hello", {"x": 1}), ("status", {"verbose": True})):
        reply = helper.call(cmd, args)
        assert reply["error"]["code"] == protocol.INVALID_ARGUMENT, (cmd, args)
        assert "field" in reply["error"]["details"]
    assert helper.runner.calls == []


# --- the writer: coalescing and fallback --------------------------------------

def _blocked_writer(tmp_path):
    """A helper whose writer is stuck inside a first `wg set` until the gate opens."""
    h = Helper(tmp_path).start()
    h.runner.gate = threading.Event()
    first = threading.Thread(target=h.writer.apply, args=([], [peer(key(1000), "10.8.9.9/32")]))
    first.start()
    assert h.runner.entered.wait(5)
    return h, first


def _submit_all(h, jobs):
    results = [None] * len(jobs)

    def run(i, adds):
        try:
            results[i] = h.writer.apply([], adds)
        except CommandFailed as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, adds)) for i, adds in enumerate(jobs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while h.writer.pending() < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert h.writer.pending() == len(jobs)
    return threads, results


def test_concurrent_adds_are_coalesced(tmp_path):
    h, first = _blocked_writer(tmp_path)
    n = 50
    threads, results = _submit_all(h, [[peer(key(i), "10.8.1.%d/32" % i)] for i in range(1, n + 1)])
    h.runner.gate.set()
    for t in threads + [first]:
        t.join(5)
    sets = h.runner.wg_sets()
    assert len(sets) == 2                      # the blocked one, then one for all n
    assert sets[1].count("peer") == n
    assert sets[1][:3] == ["wg", "set", IF]
    assert results == [{"removed": 0, "applied": 1}] * n
    assert (h.writer.wg_set_calls, h.writer.jobs_applied) == (2, n + 1)
    h.writer.stop()


def test_last_operation_on_a_key_wins(tmp_path):
    h, first = _blocked_writer(tmp_path)
    order = [([], [peer(K1, "10.8.0.2/32")]), ([K1], []), ([], [peer(K1, "10.8.0.5/32", keepalive=7)])]
    threads = []
    for removes, adds in order:  # queued one after the other, in this order
        t = threading.Thread(target=h.writer.apply, args=(removes, adds))
        t.start()
        threads.append(t)
        while h.writer.pending() < len(threads):
            time.sleep(0.002)
    h.runner.gate.set()
    for t in threads + [first]:
        t.join(5)
    assert h.runner.wg_sets()[1] == [
        "wg", "set", IF, "peer", K1, "allowed-ips", "10.8.0.5/32", "persistent-keepalive", "7"]
    h.writer.stop()


def test_failed_merge_is_retried_job_by_job(tmp_path):
    h, first = _blocked_writer(tmp_path)
    bad = key(666)
    h.runner.fail = lambda argv: "Invalid key" if bad in argv else None
    jobs = [[peer(K1, "10.8.0.2/32")], [peer(bad, "10.8.0.3/32")], [peer(K2, "10.8.0.4/32")]]
    threads, results = _submit_all(h, jobs)
    h.runner.gate.set()
    for t in threads + [first]:
        t.join(5)
    sets = h.runner.wg_sets()
    assert [s.count("peer") for s in sets] == [1, 3, 1, 1, 1]   # blocked, merged, then one by one
    assert [s[4] for s in sets[2:]] == [K1, bad, K2]
    assert results[0] == {"removed": 0, "applied": 1} and results[2] == {"removed": 0, "applied": 1}
    assert isinstance(results[1], CommandFailed) and results[1].stderr == "Invalid key"
    assert set(h.runner.peers) >= {K1, K2}
    assert h.writer.jobs_applied == 3  # the blocked one, K1 and K2
    h.writer.stop()


def test_stopped_writer_refuses_work(helper):
    helper.writer.stop()
    assert helper.call("add_peers", {"peers": [peer(K1)]})["error"]["code"] == protocol.INTERFACE_DOWN


# --- the server key -----------------------------------------------------------

def test_server_key_is_created_once_and_never_in_argv(tmp_path):
    state = tmp_path / "state"
    runner = FakeRunner()
    path, public = keys.ensure_server_key(str(state), runner)
    assert public == SERVER_PUBLIC
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    private = open(path).read().strip()
    raw = base64.b64decode(private, validate=True)
    assert len(raw) == 32 and raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
    assert runner.calls == [["wg", "pubkey"]]
    assert runner.stdins == [(["wg", "pubkey"], private + "\n")]

    # Restart: the same key, no new file.
    again, _ = keys.ensure_server_key(str(state), runner)
    assert again == path and open(path).read().strip() == private
    assert os.listdir(state) == ["server.key"]

    # Bring the interface up and change peers: the key is only ever a path.
    h = Helper(tmp_path)
    h.runner = runner
    h.iface = Interface(h.settings, runner, path, socket_dir=str(tmp_path))
    h.writer = Writer(runner, IF)
    h.ctx = Context(h.settings, runner, h.iface, h.writer, public)
    h.iface.up()
    h.writer.start()
    h.result("add_peers", {"peers": [peer(K1)]})
    h.result("status")
    h.writer.stop()
    assert ["wg", "set", IF, "listen-port", "51820", "private-key", path] in runner.calls
    for argv in runner.calls:
        assert not any(private in arg for arg in argv), argv


def test_server_key_refuses_garbage(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "server.key").write_text("not a key\n")
    with pytest.raises(keys.KeyFileError):
        keys.ensure_server_key(str(state), FakeRunner())


def test_server_key_tightens_loose_permissions(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    keyfile = state / "server.key"
    keyfile.write_text(keys.generate_private_key() + "\n")
    keyfile.chmod(0o644)
    keys.ensure_server_key(str(state), FakeRunner())
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


# --- the real Runner (read-only commands only) --------------------------------

def test_real_runner_reports_failures():
    runner = Runner(timeout=5)
    with pytest.raises(CommandFailed) as info:
        runner.ip("link", "show", "dev", "om-nonexist0")
    assert info.value.command == "ip" and info.value.exit_code == 1
    assert "does not exist" in info.value.stderr


def test_real_runner_feeds_stdin():
    runner = Runner(timeout=5)
    private = keys.generate_private_key()
    public = runner.wg("pubkey", stdin=private + "\n").strip()
    assert len(base64.b64decode(public)) == 32 and public != private


def test_real_runner_kills_a_command_past_its_timeout():
    # `ip monitor` only reads and never exits by itself.
    runner = Runner(timeout=0.5)
    with pytest.raises(CommandFailed) as info:
        runner.ip("monitor", "link")
    assert info.value.command == "ip" and info.value.exit_code is None
    assert info.value.stderr == "timed out after 0.5s"


def test_clean_stderr_redacts_and_truncates():
    secret = keys.generate_private_key()
    assert clean_stderr(("bad key %s\n" % secret).encode(), secret + "\n") == "bad key [redacted]"
    assert len(clean_stderr("x" * 5000)) == 503
