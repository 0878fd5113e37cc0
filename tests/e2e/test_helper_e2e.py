"""The real helper, real wireguard-go, inside throw-away network namespaces."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from app.helper import HelperClient

from .netns import unique_ifname, veth
from .wgclient import WgClient

HELPER_BIN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "orbmesh-wghelper")
WG_SOCKET_DIR = "/var/run/wireguard"


def genkey():
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    return subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                          check=True).stdout.strip()


class HelperProc:
    def __init__(self, ns, workdir):
        self.ns = ns
        self.ifname = unique_ifname("omh")
        self.socket = os.path.join(workdir, "h.sock")
        self.state_dir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, "helper.log")
        self.proc = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ORBMESH_")}
        self.env.update({
            "ORBMESH_INTERFACE": self.ifname,
            "ORBMESH_HELPER_SOCKET": self.socket,
            "ORBMESH_HELPER_STATE_DIR": self.state_dir,
            "ORBMESH_HELPER_WATCH_INTERVAL": "0.3",
        })

    def log(self):
        try:
            return Path(self.log_path).read_text()
        except FileNotFoundError:
            return ""

    def start(self, timeout=20):
        with open(self.log_path, "a") as log:
            self.proc = self.ns.popen([HELPER_BIN, "--log-level", "debug"], env=self.env,
                                      stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "helper exited %s:\n%s" % (self.proc.returncode, self.log())
            if os.path.exists(self.socket):
                try:
                    if self.call("hello")["ok"]:
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError("helper did not come up:\n" + self.log())

    def call(self, cmd, args=None, timeout=30):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket)
            sock.sendall(json.dumps({"id": 1, "cmd": cmd, "args": args or {}}).encode() + b"\n")
            with sock.makefile("rb") as reader:
                return json.loads(reader.readline())
        finally:
            sock.close()

    def result(self, cmd, args=None):
        reply = self.call(cmd, args)
        assert reply["ok"], "%s -> %s\n%s" % (cmd, reply, self.log())
        return reply["result"]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def down(self):
        """`orbmesh-wghelper down` with the same settings: (exit status, output)."""
        done = self.ns.run(HELPER_BIN, "down", check=False, env=self.env)
        return done.returncode, done.stdout + done.stderr

    def link_exists(self):
        return self.ns.run("ip", "link", "show", "dev", self.ifname, check=False).returncode == 0


@pytest.fixture
def workdir():
    # Short, so the socket path stays far below the 108-byte limit.
    path = tempfile.mkdtemp(prefix="omh-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def helper(netns, workdir):
    ns = netns("helper")
    h = HelperProc(ns, workdir).start()
    yield h
    if h.proc.poll() is None:
        h.stop()


def peer(public_key, *ips, **extra):
    return dict({"public_key": public_key, "allowed_ips": list(ips)}, **extra)


def test_helper_comes_up_stops_leaving_the_interface_and_down_removes_it(helper):
    status = helper.result("status")
    private = Path(helper.state_dir, "server.key").read_text()
    expected_public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True,
                                     text=True, check=True).stdout.strip()
    assert status["public_key"] == expected_public
    assert status["backend"] == "wireguard-go" and status["running"] is True
    assert status["interface"] == helper.ifname and status["peer_count"] == 0
    assert private.strip() not in json.dumps(status)
    assert stat.S_IMODE(os.stat(helper.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(helper.state_dir, "server.key")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(helper.socket).st_mode) == 0o660

    link = helper.ns.run("ip", "-4", "address", "show", "dev", helper.ifname).stdout
    assert "inet 10.8.0.1/16" in link and "mtu 1420" in link and ",UP" in link
    wg = helper.ns.run("wg", "show", helper.ifname, "listen-port").stdout.strip()
    assert wg == "51820"
    assert private.strip() not in helper.log()
    uapi = os.path.join(WG_SOCKET_DIR, helper.ifname + ".sock")

    # `down` refuses while the helper runs: its watcher would re-create the interface.
    code, output = helper.down()
    assert code == 1 and "another helper is listening" in output and helper.link_exists()

    # A stop leaves the interface and its wireguard-go for the clients; only the socket goes.
    assert helper.stop() == 0, helper.log()
    assert not os.path.exists(helper.socket)
    assert helper.link_exists() and os.path.exists(uapi) and len(helper.ns.pids()) == 1
    assert helper.ns.run("wg", "show", helper.ifname, "public-key").stdout.strip() == expected_public

    # `down` removes it; wireguard-go ends with its link.
    code, output = helper.down()
    assert code == 0, output
    assert not helper.link_exists()
    deadline = time.monotonic() + 10
    while (os.path.exists(uapi) or helper.ns.pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(uapi) and helper.ns.pids() == []
    assert helper.down()[0] == 0  # nothing left: still fine


def test_add_update_remove_and_dump(helper):
    a, b, c = genkey(), genkey(), genkey()
    assert helper.result("apply_peers", {"add": [
        peer(a, "10.8.0.2/32", endpoint="192.0.2.50:51820", keepalive=25),
        peer(b, "10.8.0.3/32", "10.8.0.4/32"),
    ]}) == {"removed": 0, "applied": 2}
    dump = {p["public_key"]: p for p in helper.result("dump_peers")["peers"]}
    assert dump[a]["allowed_ips"] == ["10.8.0.2/32"] and dump[a]["keepalive"] == 25
    assert dump[a]["endpoint"] == "192.0.2.50:51820"
    assert sorted(dump[b]["allowed_ips"]) == ["10.8.0.3/32", "10.8.0.4/32"]
    assert dump[b]["endpoint"] is None and dump[b]["keepalive"] == 0

    # Update: keepalive off, new address.
    helper.result("apply_peers", {"add": [peer(a, "10.8.0.9/32", keepalive=0)]})
    dump = {p["public_key"]: p for p in helper.result("dump_peers")["peers"]}
    assert dump[a]["allowed_ips"] == ["10.8.0.9/32"] and dump[a]["keepalive"] == 0

    # Key swap keeping the address, in one wg set.
    assert helper.result("apply_peers", {"remove": [b], "add": [peer(c, "10.8.0.3/32")]}) == {
        "removed": 1, "applied": 1}
    # Removing a key that is not there is not an error.
    assert helper.result("apply_peers", {"remove": [a, genkey()]}) == {"removed": 2, "applied": 0}
    dump = helper.result("dump_peers")["peers"]
    assert [(p["public_key"], p["allowed_ips"]) for p in dump] == [(c, ["10.8.0.3/32"])]
    raw = helper.ns.run("wg", "show", helper.ifname, "peers").stdout.split()
    assert raw == [c]

    bad = helper.call("apply_peers", {"add": [peer(a, "10.9.0.2/32")]})
    assert bad["error"]["code"] == "INVALID_ARGUMENT"
    assert helper.ns.run("wg", "show", helper.ifname, "peers").stdout.split() == [c]


def test_the_app_walks_a_dump_in_pages_by_key(helper):
    """The app's client (app/helper.py dump_pages) against the root helper and wireguard-go: the pages
    hold the whole dump, by key, and the last one lets the helper's copy go."""
    keys = [genkey() for _ in range(7)]
    helper.result("apply_peers", {"add": [peer(k, "10.8.2.%d/32" % (n + 2)) for n, k in enumerate(keys)]})
    whole = {p["public_key"]: p for p in helper.result("dump_peers")["peers"]}
    client = HelperClient(helper.socket, 10)
    try:
        walked = list(client.dump_pages(3))
    finally:
        client.close()
    assert [len(page) for page, _ in walked] == [3, 3, 1]
    assert [through for _, through in walked] == [sorted(keys)[2], sorted(keys)[5], None]
    assert [p for page, _ in walked for p in page] == [whole[k] for k in sorted(keys)]
    gone = helper.call("dump_peers", {"dump": 1, "offset": 0, "limit": 3})
    assert gone["error"]["code"] == "INVALID_ARGUMENT" and gone["error"]["details"]["field"] == "dump"


def test_sync_removes_unknown_and_adds_missing(helper):
    a, b, c = genkey(), genkey(), genkey()
    helper.result("apply_peers", {"add": [peer(a, "10.8.0.2/32"), peer(b, "10.8.0.3/32")]})
    result = helper.result("sync_peers", {"peers": [
        peer(b, "10.8.0.5/32", keepalive=10), peer(c, "10.8.0.6/32")]})
    assert result == {"added": 1, "removed": 1, "updated": 1, "kept": 0, "endpoints": {}}  # none seen yet
    dump = {p["public_key"]: (p["allowed_ips"], p["keepalive"]) for p in helper.result("dump_peers")["peers"]}
    assert dump == {b: (["10.8.0.5/32"], 10), c: (["10.8.0.6/32"], 0)}
    again = helper.result("sync_peers", {"peers": [
        peer(b, "10.8.0.5/32", keepalive=10), peer(c, "10.8.0.6/32")]})
    assert again == {"added": 0, "removed": 0, "updated": 0, "kept": 0, "endpoints": {}}


def test_concurrent_adds_all_land(helper):
    keys = [genkey() for _ in range(40)]
    results = []

    def add(i):
        results.append(helper.call("apply_peers", {"add": [peer(keys[i], "10.8.1.%d/32" % (i + 2))]}))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r["ok"] for r in results) and len(results) == len(keys)
    status = helper.result("status")
    assert status["peer_count"] == len(keys)
    assert status["jobs_applied"] == len(keys)
    assert 1 <= status["wg_set_calls"] <= len(keys)


def test_restart_adopts_the_interface_and_its_peers(netns, workdir):
    ns = netns("restart")
    first = HelperProc(ns, workdir).start()
    one = first.result("status")
    pub = genkey()
    first.result("apply_peers", {"add": [peer(pub, "10.8.0.2/32")]})
    index = ns.run("cat", "/sys/class/net/%s/ifindex" % first.ifname).stdout
    assert first.stop() == 0, first.log()

    def again(**env):
        helper = HelperProc(ns, workdir)
        helper.ifname = first.ifname
        helper.env.update(ORBMESH_INTERFACE=first.ifname, **env)
        return helper.start()

    second = again()
    try:
        two = second.result("status")
        assert two["public_key"] == one["public_key"]
        assert two["generation"] != one["generation"]  # the app syncs: only what differs
        assert two["peer_count"] == 1  # the same interface, peers and sessions included
        assert ns.run("cat", "/sys/class/net/%s/ifindex" % first.ifname).stdout == index
        assert "adopting interface %s (wireguard-go) as it is" % first.ifname in second.log()
    finally:
        assert second.stop() == 0, second.log()

    # Settings that need another interface: it is re-created, and the log says so.
    third = again(ORBMESH_LISTEN_PORT="51821")
    try:
        assert third.result("status")["peer_count"] == 0
        assert third.ns.run("wg", "show", first.ifname, "listen-port").stdout.strip() == "51821"
        assert "has another key or listen port; re-creating it" in third.log()
    finally:
        assert third.stop() == 0, third.log()
        assert third.down()[0] == 0


def test_watcher_recreates_a_deleted_interface(helper):
    before = helper.result("hello")["generation"]
    helper.ns.run("ip", "link", "del", "dev", helper.ifname)
    deadline = time.monotonic() + 15
    hello = None
    while time.monotonic() < deadline:
        hello = helper.result("hello")
        if hello["generation"] != before and hello["running"]:
            break
        time.sleep(0.1)
    assert hello["generation"] != before, helper.log()
    assert helper.link_exists()
    assert helper.result("status")["backend"] == "wireguard-go"
    pub = genkey()
    helper.result("apply_peers", {"add": [peer(pub, "10.8.0.2/32")]})
    assert helper.ns.run("wg", "show", helper.ifname, "peers").stdout.split() == [pub]


def test_client_pings_the_gateway_through_the_tunnel(netns, workdir):
    server_ns, client_ns = netns("srv"), netns("cli")
    veth(server_ns, "192.0.2.1/24", client_ns, "192.0.2.2/24")
    helper = HelperProc(server_ns, workdir).start()
    client = WgClient(client_ns, unique_ifname("omc"))
    try:
        server_key = helper.result("status")["public_key"]
        client.configure(server_key, "192.0.2.1:51820", "10.8.0.42/32", ["10.8.0.0/16"], mtu=1420)

        # The server does not know the client yet: no handshake, no reply.
        assert not client.ping("10.8.0.1", timeout=1)

        helper.result("apply_peers", {"add": [peer(client.public_key, "10.8.0.42/32")]})
        assert any(client.ping("10.8.0.1", timeout=2) for _ in range(5)), helper.log()

        (seen,) = helper.result("dump_peers")["peers"]
        assert seen["public_key"] == client.public_key
        assert seen["latest_handshake"] > 0 and seen["rx_bytes"] > 0 and seen["tx_bytes"] > 0
        assert seen["endpoint"].startswith("192.0.2.2:")

        helper.result("apply_peers", {"remove": [client.public_key]})
        assert not client.ping("10.8.0.1", timeout=1)
    finally:
        client.close()
        assert helper.stop() == 0, helper.log()
