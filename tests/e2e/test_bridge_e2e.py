"""Bridge (multi-hop) mode and SmartConnect with two real nodes, end to end.

One topology for the whole module (building it costs more than the tests):

    client 192.0.2.2 ── 192.0.2.1 ENTRY 203.0.113.1 ── 203.0.113.100 INTERNET 198.51.100.100 ── 198.51.100.1 EXIT
                                                        (whoami :8000 on .100 and .101,
                                                         OrbNET registry :8001)

Entry and exit each run the helper and gunicorn with real wireguard-go and
NAT on their uplink; the exit is reached by the entry only through the
internet namespace, the client never reaches it.  A bridged client's
whoami answer is the exit's address, a direct client's the entry's.
Client tunnels route one whoami address each (203.0.113.100 for the bridged
client, .101 for the direct one) so both can run side by side in the
client namespace.
"""
import http.server
import json
import shutil
import socket
import threading

import pytest

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import INTERNET_ADDR, SERVER_UPLINK_ADDR, Internet, _WhoAmI
from .netns import Netns, veth
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient, keypair

pytestmark = pytest.mark.e2e

EXIT_ADDR = "198.51.100.1"
EXIT_GW = "198.51.100.100"
WHOAMI_DIRECT = "203.0.113.101"   # routed through the direct client's tunnel
REGISTRY_PORT = 8001
BRIDGE_ADDR = "10.9.255.1"
RULE_PREF = "20000"
TABLE = "51900"


class _Registry(http.server.BaseHTTPRequestHandler):
    document = {}

    def do_GET(self):  # noqa: N802
        body = json.dumps(self.document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(ns, addr, port, handler):
    listener = ns.socket_in(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(16)
    httpd = http.server.ThreadingHTTPServer((addr, port), handler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = listener
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return httpd


class Topology:
    def __init__(self, made, tmp):
        def netns(tag):
            ns = Netns(tag)
            made.append(ns)
            return ns.create()

        self.client, self.entry_ns, self.exit_ns = netns("cli"), netns("entry"), netns("exit")
        veth(self.entry_ns, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        self.internet = Internet(netns, self.entry_ns)
        inet = self.internet.ns
        exit_uplink, inet_side = veth(self.exit_ns, EXIT_ADDR + "/24", inet, EXIT_GW + "/24")
        inet.run("ip", "address", "add", WHOAMI_DIRECT + "/24", "dev", inet_side)
        inet.run("sysctl", "-w", "net.ipv4.ip_forward=1")  # the internet namespace routes, ours only
        self.entry_ns.run("ip", "route", "add", "198.51.100.0/24", "via", INTERNET_ADDR)
        self.exit_ns.run("ip", "route", "add", "203.0.113.0/24", "via", EXIT_GW)
        self.servers = [_serve(inet, WHOAMI_DIRECT, 8000, _WhoAmI)]
        self.registry = _serve(inet, INTERNET_ADDR, REGISTRY_PORT, _Registry)

        self.exit = Stack(self.exit_ns, inet, tmp / "exit", workers=1, server_addr=EXIT_ADDR)
        self.exit.env.update({"ORBMESH_POOL": "10.9.0.0/16", "ORBMESH_NAT_UPLINK": exit_uplink})
        self.entry = Stack(self.entry_ns, self.client, tmp / "entry", workers=1)
        policy = tmp / "policy.json"
        policy.write_text(json.dumps({"rules": [{"networks": ["192.0.2.0/24"], "exits": ["exit-1"]}]}))
        self.entry.env.update({
            "ORBMESH_NAT_UPLINK": self.internet.uplink,
            "ORBMESH_EXIT_REGISTRY_URL": "http://%s:%d/exits" % (INTERNET_ADDR, REGISTRY_PORT),
            "ORBMESH_EXIT_REGISTRY_INTERVAL": "1",
            "ORBMESH_EXIT_API_TIMEOUT": "3",
            "ORBMESH_BRIDGE_IDLE_GRACE": "2",
            "ORBMESH_SMARTCONNECT_POLICY": str(policy),
            "ORBMESH_SMARTCONNECT_HEALTH_TTL": "0",
        })
        for stack in (self.exit, self.entry):
            stack.tmp.mkdir()

    def publish_registry(self):
        exit_key = self.exit_ns.run("wg", "show", self.exit.interface, "public-key").stdout.strip()
        _Registry.document = {"exits": [
            {"id": "exit-1", "endpoint": "%s:51820" % EXIT_ADDR, "publicKey": exit_key,
             "apiUrl": "http://%s:8080" % EXIT_ADDR, "apiKey": self.exit.api_key, "bridgeAddress": BRIDGE_ADDR},
            {"id": "broken", "endpoint": "not-an-endpoint", "publicKey": exit_key,
             "apiUrl": "http://%s:8080" % EXIT_ADDR, "apiKey": "secret-broken-key-0123456789"},
        ]}

    @property
    def bridge_link(self):
        return self.entry.interface + "b0"

    # what the kernel of the entry holds

    def rules(self):
        return self.entry_ns.run("ip", "-4", "rule", "show", "pref", RULE_PREF).stdout.strip()

    def table_routes(self):
        out = self.entry_ns.run("ip", "-4", "route", "show", "table", "all").stdout
        return [line for line in out.splitlines() if "table %s" % TABLE in line]

    def links(self):
        return self.entry_ns.run("ip", "-o", "link").stdout

    def nothing_bridged(self):
        tables = self.entry_ns.run("nft", "list", "tables").stdout
        return (not self.rules() and not self.table_routes() and self.bridge_link not in self.links()
                and "orbmesh_b0" not in tables)

    def exit_endpoints(self):
        out = self.exit_ns.run("wg", "show", self.exit.interface, "endpoints").stdout
        return dict(line.split("\t") for line in out.splitlines() if "\t" in line)


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    requirements("nft")
    made = []
    sockets_before = _wireguard_sockets()
    t = None
    try:
        t = Topology(made, tmp_path_factory.mktemp("bridge"))
        with t.exit.running():
            t.publish_registry()
            with t.entry.running():
                yield t
    finally:
        if t is not None:
            for server in t.servers + [t.registry]:
                server.shutdown()
                server.server_close()
            t.internet.close()
        inodes = {ns.inode for ns in made}
        for ns in reversed(made):
            ns.delete()
        _remove_dead_sockets(_wireguard_sockets() - sockets_before)
        assert not wireguard_go_in(inodes), "wireguard-go left running"


def tunnel(t, device, whoami_addr, **body):
    """A real WireGuard client that routes only `whoami_addr` through its tunnel."""
    client = WgClient(t.client, "omc" + device[-8:])
    status, reply = t.entry.call("POST", "/wireguard/connect", dict(body, publicKey=client.public_key),
                                 token=t.entry.token("bridge-user", device))
    assert status == 200, reply
    client.configure(server_public_key=reply["serverPublicKey"], endpoint=reply["serverEndpoint"],
                     address_cidr=reply["ip"], allowed_ips=[whoami_addr + "/32"], mtu=reply["mtu"],
                     keepalive=reply["keepalive"])
    return client, reply


def whoami(t, addr, timeout=3):
    try:
        status, _, body = t.client.http("GET", "http://%s:8000/" % addr, timeout=timeout)
    except OSError:
        return None
    return body.decode() if status == 200 else None


def sees(t, addr, expected, what):
    wait_for(lambda: whoami(t, addr) == expected, timeout=40, interval=0.3, what=what)


def disconnect(t, device):
    status, _ = t.entry.call("POST", "/wireguard/disconnect", token=t.entry.token("bridge-user", device))
    assert status == 200


def test_direct_bridge_and_smartconnect_side_by_side(topo):
    t = topo
    # force_direct wins over a policy that recommends the bridge for this client.
    direct, d = tunnel(t, "dev-direct", WHOAMI_DIRECT, force_direct=True)
    bridged, b = tunnel(t, "dev-bridge", INTERNET_ADDR, exitServerId="exit-1")
    try:
        assert (d["mode"], d["exitServerId"]) == ("direct", None)
        assert (b["mode"], b["exitServerId"]) == ("bridge", "exit-1")
        assert b["serverEndpoint"] == d["serverEndpoint"] == "%s:51820" % SERVER_ADDR
        sees(t, WHOAMI_DIRECT, SERVER_UPLINK_ADDR, "the direct client seen as the entry")
        sees(t, INTERNET_ADDR, EXIT_ADDR, "the bridged client seen as the exit")
        assert whoami(t, WHOAMI_DIRECT) == SERVER_UPLINK_ADDR  # the direct client still goes out directly

        # The client cannot reach the exit itself; the exit knows the entry
        # (its underlay address), never the client.
        assert t.client.run("ping", "-n", "-c", "1", "-W", "1", EXIT_ADDR, check=False).returncode != 0
        bridge_key = t.entry_ns.run("wg", "show", t.bridge_link, "public-key").stdout.strip()
        endpoints = t.exit_endpoints()
        assert endpoints[bridge_key].startswith(SERVER_UPLINK_ADDR + ":")
        assert not any(CLIENT_ADDR in e for e in endpoints.values())
        assert t.rules() == "%s:\tfrom %s lookup %s" % (RULE_PREF, b["ip"].split("/")[0], TABLE)
        assert any(line.startswith("unreachable default") for line in t.table_routes())
        log = t.entry.app_log.read_text()
        assert "skipping entry 1 (broken): bad bridgeAddress, endpoint" in log
        assert t.exit.api_key not in log and "secret-broken-key" not in log

        # SmartConnect: no exitServerId, the policy matches 192.0.2.0/24 and the exit is healthy.
        status, smart = t.entry.call("POST", "/wireguard/connect", {"publicKey": keypair()[1]},
                                     token=t.entry.token("bridge-user", "dev-smart"))
        assert status == 200 and (smart["mode"], smart["exitServerId"]) == ("bridge", "exit-1"), smart
        assert len(t.rules().splitlines()) == 2

        # Disconnect removes each rule; the tunnel goes once it is idle past the grace.
        disconnect(t, "dev-smart")
        disconnect(t, "dev-bridge")
        assert t.rules() == ""
        wait_for(t.nothing_bridged, timeout=30, what="the idle tunnel taken down")
        wait_for(lambda: bridge_key not in t.exit_endpoints(), timeout=10, what="entry unregistered on the exit")
        assert whoami(t, WHOAMI_DIRECT) == SERVER_UPLINK_ADDR
    finally:
        direct.close()
        bridged.close()
        disconnect(t, "dev-direct")


def test_unknown_exit_and_exit_down_allocate_nothing(topo):
    t = topo
    before = (t.entry.db_peers(), t.entry.wg_peers())
    status, body = t.entry.call("POST", "/wireguard/connect",
                                {"publicKey": keypair()[1], "exitServerId": "no-such-exit"},
                                token=t.entry.token("bridge-user", "dev-x"))
    assert status == 404 and body["error"]["code"] == "EXIT_NOT_FOUND"
    assert (t.entry.db_peers(), t.entry.wg_peers()) == before and t.nothing_bridged()

    t.exit.stop_app()  # the exit's API is down
    try:
        status, body = t.entry.call("POST", "/wireguard/connect", {"publicKey": keypair()[1], "exitServerId": "exit-1"},
                                    token=t.entry.token("bridge-user", "dev-x"))
        assert status == 502 and body["error"]["code"] == "BRIDGE_UNAVAILABLE", body
        assert (t.entry.db_peers(), t.entry.wg_peers()) == before
        assert t.rules() == ""
        # SmartConnect finds the exit unhealthy and connects directly.
        status, body = t.entry.call("POST", "/wireguard/connect", {"publicKey": keypair()[1]},
                                    token=t.entry.token("bridge-user", "dev-x"))
        assert status == 200 and body["mode"] == "direct", body
        disconnect(t, "dev-x")
        wait_for(t.nothing_bridged, timeout=30, what="nothing bridged")
    finally:
        t.exit.start_app()


def test_registry_down_restart_uses_cached_copy_and_reconcile_restores(topo):
    t = topo
    t.registry.shutdown()  # OrbNET stops answering
    t.registry.server_close()
    t.entry.stop_app()
    t.entry.start_app()
    bridged, b = tunnel(t, "dev-cached", INTERNET_ADDR, exitServerId="exit-1")
    try:
        assert b["mode"] == "bridge"
        sees(t, INTERNET_ADDR, EXIT_ADDR, "bridged through the cached registry")
        assert "keeping the last good copy" in t.entry.app_log.read_text()

        # A helper stop leaves the bridge up: tunnel, rules, routes and its masquerade ...
        before = (t.rules(), t.table_routes(), t.entry_ns.run("nft", "list", "table", "inet", "orbmesh").stdout)
        handshake = t.client.run("wg", "show", bridged.ifname, "latest-handshakes").stdout
        t.entry.stop_helper()
        assert (t.rules(), t.table_routes(), t.entry_ns.run("nft", "list", "table", "inet", "orbmesh").stdout) \
            == before and 'oifname "%s"' % t.bridge_link in before[2]
        assert whoami(t, INTERNET_ADDR) == EXIT_ADDR, "bridged traffic stopped with the helper"
        # ... and the next helper adopts it: its first ruleset keeps the bridge's masquerade, the app's
        # reconcile re-sends the bridge, and each rule is there once; the session goes on.
        t.entry.start_helper()
        assert 'oifname "%s"' % t.bridge_link in t.entry_ns.run("nft", "list", "table", "inet", "orbmesh").stdout
        assert whoami(t, INTERNET_ADDR) == EXIT_ADDR
        wait_for(lambda: "bridge %s up" % t.bridge_link in t.entry.helper_log.read_text().split("listening on")[-1],
                 timeout=30, what="the bridge re-sent by reconcile")
        assert (t.rules(), t.table_routes(), t.entry_ns.run("nft", "list", "table", "inet", "orbmesh").stdout) \
            == before
        assert whoami(t, INTERNET_ADDR) == EXIT_ADDR
        assert t.client.run("wg", "show", bridged.ifname, "latest-handshakes").stdout == handshake

        # The exit tunnel goes away: the client's traffic stops, it does not leak out directly.
        t.entry_ns.run("ip", "link", "del", "dev", t.bridge_link)
        assert whoami(t, INTERNET_ADDR) is None
        assert any(line.startswith("unreachable default") for line in t.table_routes())
    finally:
        bridged.close()
        disconnect(t, "dev-cached")
    wait_for(t.nothing_bridged, timeout=30, what="nothing bridged after the last disconnect")
