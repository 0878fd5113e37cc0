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
client namespace.  For the isolation test, the entry and the exit each
have a LAN host (172.16.8.10, 172.16.9.10) in a namespace of its own.

The entry's uplink is dual stack (2001:db8:113::1, NAT66 of its unique-local
pool6, net.ipv6.conf.all.forwarding=1 as an operator sets it), so a bridged
client's IPv6 *could* leave directly; two UDP probe hosts on the internet
(2001:db8:114::101 and ::102, beyond the router) show that only the direct
client's does.

The registry gives the entry a key of the exit that is scoped to the
entry's own bridge user (the exit's ORBMESH_SCOPED_API_KEYS), as production
should; the entry's bridge key is made before either node starts, so the
exit can be configured with that user.  Plain http is allowed on both
sides (ORBMESH_EXIT_ALLOW_HTTP): the link is a test namespace.
"""
import http.server
import ipaddress
import json
import os
import secrets
import shutil
import socket

import pytest

from app.bridge.bridges import bridge_user

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import INTERNET_ADDR, SERVER_UPLINK_ADDR, SERVER_UPLINK_ADDR6, Internet, UdpSink, _WhoAmI, add_address
from .internet import serve as _serve
from .netns import creator, unique_ifname, veth
from .probes import Echo, every, reach
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient, keypair

pytestmark = pytest.mark.e2e

EXIT_ADDR = "198.51.100.1"
EXIT_GW = "198.51.100.100"
WHOAMI_DIRECT = "203.0.113.101"   # routed through the direct client's tunnel
REGISTRY_PORT = 8001
BRIDGE_ADDR = "10.9.255.1"
ENTRY_LAN, EXIT_LAN = "172.16.8.10", "172.16.9.10"
RULE_PREF = "20000"
TABLE = "51900"
PROBE6_DIRECT = "2001:db8:114::101"
PROBE6_BRIDGED = "2001:db8:114::102"


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


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)

        self.client, self.entry_ns, self.exit_ns = netns("cli"), netns("entry"), netns("exit")
        veth(self.entry_ns, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        self.internet = Internet(netns, self.entry_ns, ipv6=True)
        inet = self.internet.ns
        self.entry_ns.run("sysctl", "-w", "net.ipv6.conf.all.forwarding=1")
        for probe in (PROBE6_DIRECT, PROBE6_BRIDGED):
            self.internet.beyond(probe)
        self.sinks = [UdpSink(inet, PROBE6_DIRECT), UdpSink(inet, PROBE6_BRIDGED)]
        exit_uplink, inet_side = veth(self.exit_ns, EXIT_ADDR + "/24", inet, EXIT_GW + "/24")
        inet.run("ip", "address", "add", WHOAMI_DIRECT + "/24", "dev", inet_side)
        inet.run("sysctl", "-w", "net.ipv4.ip_forward=1")  # the internet namespace routes, ours only
        self.exit_ns.run("ip", "route", "add", "203.0.113.0/24", "via", EXIT_GW)
        # LANs routed both ways: only a node's firewall stands between them and the bridge.
        self.entry_lan, self.exit_lan = netns("elan"), netns("xlan")
        for node, lan, addr in ((self.entry_ns, self.entry_lan, ENTRY_LAN), (self.exit_ns, self.exit_lan, EXIT_LAN)):
            router = addr.rsplit(".", 1)[0] + ".1"
            lan_if, _ = veth(node, router + "/24", lan, addr + "/24")
            lan.run("ip", "route", "add", "default", "via", router)
            node.run("sysctl", "-w", "net/ipv4/conf/%s/forwarding=1" % lan_if)
        self.servers = [_serve(inet, WHOAMI_DIRECT, 8000, _WhoAmI)]
        self.registry = _serve(inet, INTERNET_ADDR, REGISTRY_PORT, _Registry)

        self.exit = Stack(self.exit_ns, inet, tmp / "exit", workers=1, server_addr=EXIT_ADDR)
        self.entry = Stack(self.entry_ns, self.client, tmp / "entry", workers=1)
        for stack in (self.exit, self.entry):
            stack.tmp.mkdir()
        self.bridge_key = self._entry_bridge_key()
        self.bridge_user = bridge_user(self.bridge_key)
        self.scoped_key = secrets.token_urlsafe(24)  # the entry's key on the exit
        self.exit.env.update({"ORBMESH_POOL": "10.9.0.0/16", "ORBMESH_NAT_UPLINK": exit_uplink,
                              "ORBMESH_SCOPED_API_KEYS": "%s=%s" % (self.scoped_key, self.bridge_user)})
        policy = tmp / "policy.json"
        policy.write_text(json.dumps({"rules": [{"networks": ["192.0.2.0/24"], "exits": ["exit-1"]}]}))
        self.entry.env.update({
            "ORBMESH_NAT_UPLINK": self.internet.uplink,
            "ORBMESH_BRIDGE_NETWORKS": "10.9.0.0/16",  # the exit's pool
            "ORBMESH_EXIT_REGISTRY_URL": "http://%s:%d/exits" % (INTERNET_ADDR, REGISTRY_PORT),
            "ORBMESH_EXIT_REGISTRY_INTERVAL": "1",
            "ORBMESH_EXIT_API_TIMEOUT": "3",
            "ORBMESH_BRIDGE_IDLE_GRACE": "2",
            "ORBMESH_SMARTCONNECT_POLICY": str(policy),
            "ORBMESH_SMARTCONNECT_HEALTH_TTL": "0",
            "ORBMESH_EXIT_ALLOW_HTTP": "true",
        })

    def _entry_bridge_key(self):
        """Write the entry helper's bridge key (it keeps one it finds); return its public half."""
        private, public = keypair()
        state = self.entry.tmp / "helper-state"
        state.mkdir(mode=0o700)
        fd = os.open(state / "bridge.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(private + "\n")
        return public

    def publish_registry(self):
        exit_key = self.exit_ns.run("wg", "show", self.exit.interface, "public-key").stdout.strip()
        _Registry.document = {"exits": [
            {"id": "exit-1", "endpoint": "%s:51820" % EXIT_ADDR, "publicKey": exit_key,
             "apiUrl": "http://%s:8080" % EXIT_ADDR, "apiKey": self.scoped_key, "bridgeAddress": BRIDGE_ADDR},
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
            for sink in t.sinks:
                sink.close()
            t.internet.close()
        inodes = {ns.inode for ns in made}
        for ns in reversed(made):
            ns.delete()
        _remove_dead_sockets(_wireguard_sockets() - sockets_before)
        assert not wireguard_go_in(inodes), "wireguard-go left running"


def tunnel(t, device, whoami_addr, routes=(), **body):
    """A real WireGuard client that routes only `whoami_addr` (and `routes`) through its tunnel."""
    client = WgClient(t.client, unique_ifname("omc"))
    status, reply = t.entry.call("POST", "/wireguard/connect", dict(body, publicKey=client.public_key),
                                 token=t.entry.token("bridge-user", device))
    assert status == 200, reply
    client.configure(server_public_key=reply["serverPublicKey"], endpoint=reply["serverEndpoint"],
                     address_cidr=reply["ip"], allowed_ips=[whoami_addr + "/32", *routes], mtu=reply["mtu"],
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
        assert bridge_key == t.bridge_key
        endpoints = t.exit_endpoints()
        assert endpoints[bridge_key].startswith(SERVER_UPLINK_ADDR + ":")
        assert not any(CLIENT_ADDR in e for e in endpoints.values())
        assert t.rules() == "%s:\tfrom %s lookup %s" % (RULE_PREF, b["ip"].split("/")[0], TABLE)
        assert any(line.startswith("unreachable default") for line in t.table_routes())
        log = t.entry.app_log.read_text()
        assert "skipping entry 1 (broken): bad bridgeAddress, endpoint" in log
        assert t.scoped_key not in log and "secret-broken-key" not in log

        # The entry's key on the exit adds and removes its own user's peer, nothing else.
        for method, path, body in (("GET", "/wireguard/status", None), ("GET", "/metrics", None),
                                   ("POST", "/wireguard/remove-peer", {"userUuid": "someone-else"})):
            status, _, raw = t.exit.request(method, path, body, {"X-API-Key": t.scoped_key})
            assert status == 403 and json.loads(raw)["error"]["code"] == "FORBIDDEN", (path, raw)
        assert t.exit.call("GET", "/wireguard/status", api_key=t.exit.api_key)[0] == 200  # control: the full key

        # SmartConnect: no exitServerId, the policy matches 192.0.2.0/24 and the exit is healthy.
        status, smart = t.entry.call("POST", "/wireguard/connect", {"publicKey": keypair()[1]},
                                     token=t.entry.token("bridge-user", "dev-smart"))
        assert status == 200 and (smart["mode"], smart["exitServerId"]) == ("bridge", "exit-1"), smart
        assert len(t.rules().splitlines()) == 2

        # Another peer under the same user, added with OrbNET's full key once the
        # last bridged connect has registered (a scoped user may hold only one):
        # the teardown must remove the entry's own peer, not the whole user.
        other = keypair()[1]
        status, _ = t.exit.call("POST", "/wireguard/add-peer", {
            "userUuid": t.bridge_user, "publicKey": other, "allowedIPs": "10.9.255.2/32",
            "assignedIP": "10.9.255.2"}, api_key=t.exit.api_key)
        assert status == 200

        # Disconnect removes each rule; the tunnel goes once it is idle past the grace.
        disconnect(t, "dev-smart")
        disconnect(t, "dev-bridge")
        assert t.rules() == ""
        wait_for(t.nothing_bridged, timeout=30, what="the idle tunnel taken down")
        wait_for(lambda: bridge_key not in t.exit_endpoints(), timeout=10, what="entry unregistered on the exit")
        assert other in t.exit_endpoints()  # only our own peer went
        assert t.exit.call("POST", "/wireguard/remove-peer", {"userUuid": t.bridge_user},
                           api_key=t.exit.api_key) == (200, {"success": True, "message": "Peer removed successfully",
                                                            "removed": 1})
        assert whoami(t, WHOAMI_DIRECT) == SERVER_UPLINK_ADDR
    finally:
        direct.close()
        bridged.close()
        disconnect(t, "dev-direct")


def rx_packets(t):
    """Packets the entry has received on its bridge link."""
    link = json.loads(t.entry_ns.run("ip", "-j", "-s", "link", "show", "dev", t.bridge_link).stdout)[0]
    return link["stats64"]["rx"]["packets"]


def test_a_bridge_carries_only_what_a_client_may_send(topo):
    t = topo
    exit_client = WgClient(t.internet.ns, "omx" + t.exit.interface[-6:])
    status, x = t.exit.connect("exit-user", "exit-dev", exit_client.public_key)
    assert status == 200, x
    exit_client.configure(server_public_key=x["serverPublicKey"], endpoint=x["serverEndpoint"], address_cidr=x["ip"],
                          allowed_ips=["10.9.0.0/16"], mtu=x["mtu"], keepalive=x["keepalive"])
    bridged, b = tunnel(t, "dev-iso-b", INTERNET_ADDR, routes=["10.9.0.0/16", "172.16.9.0/24", "198.51.100.0/24"],
                        exitServerId="exit-1")
    x_addr, b_addr = (reply["ip"].split("/")[0] for reply in (x, b))
    echoes = [Echo(t.internet.ns, [x_addr, EXIT_GW]), Echo(t.exit_lan, [EXIT_LAN]), Echo(t.entry_lan, [ENTRY_LAN]),
              Echo(t.client, [b_addr]), Echo(t.entry_ns, [SERVER_ADDR, "10.8.0.1"])]
    # The exit's other client, its LAN, its API on its own address.  (The other hosts of its uplink's
    # network, a public one here, are the internet: a bridged client reaches them, as any client does.)
    exit_side = every(x_addr, EXIT_LAN) + [("tcp", EXIT_ADDR, 8080)]
    try:
        sees(t, INTERNET_ADDR, EXIT_ADDR, "the bridged client seen as the exit")
        assert all(reach(t.exit_ns, exit_side).values())  # the exit itself reaches them all
        assert all(reach(t.client, every(EXIT_GW)).values())  # and the bridge carries what it may

        # A bridged client reaches none of them ...
        found = reach(t.client, exit_side)
        assert not any(found.values()), found
        # ... nor does the entry itself through the link (its own packets pass
        # no rule of its own): the exit treats its entry as any client.
        link = t.bridge_link
        assert all(reach(t.entry_ns, [("tcp", INTERNET_ADDR, 8000), ("ping", "10.9.0.1")], device=link).values())
        found = reach(t.entry_ns, exit_side, device=link)
        assert not any(found.values()), found

        # A hostile exit routes the entry's clients, LAN and addresses into the
        # bridge (and the entry has a way back to it, so that only its firewall
        # is in the way): the packets arrive on the link and go no further,
        # while replies to the bridged client still come back.
        exit_if, entry_key = t.exit.interface, t.entry_ns.run("wg", "show", link, "public-key").stdout.strip()
        hostile = ["10.8.0.0/16", "172.16.8.0/24", "192.0.2.0/24"]
        t.exit_ns.run("wg", "set", exit_if, "peer", entry_key, "allowed-ips", ",".join([BRIDGE_ADDR + "/32"] + hostile))
        try:
            for net in hostile:
                t.exit_ns.run("ip", "route", "add", net, "dev", exit_if)
            t.entry_ns.run("ip", "route", "add", "10.9.0.1/32", "dev", link)
            before = rx_packets(t)
            found = reach(t.exit_ns, every(b_addr, ENTRY_LAN, "10.8.0.1", SERVER_ADDR))
            assert not any(found.values()), found
            assert rx_packets(t) - before >= len(found)
            assert whoami(t, INTERNET_ADDR) == EXIT_ADDR
        finally:
            t.exit_ns.run("wg", "set", exit_if, "peer", entry_key, "allowed-ips", BRIDGE_ADDR + "/32")
            for net in hostile:
                t.exit_ns.run("ip", "route", "del", net, "dev", exit_if, check=False)
            t.entry_ns.run("ip", "route", "del", "10.9.0.1/32", "dev", link, check=False)
    finally:
        for echo in echoes:
            echo.close()
        for client in (exit_client, bridged):
            client.close()
        t.exit.call("POST", "/wireguard/disconnect", token=t.exit.token("exit-user", "exit-dev"))
        disconnect(t, "dev-iso-b")
    wait_for(t.nothing_bridged, timeout=30, what="the idle tunnel taken down")


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


def route_ipv6(t, client, reply, whoami_addr, address6, probe):
    """Give a tunnel client an IPv6 address and send one probe host through its tunnel."""
    t.client.run("wg", "set", client.ifname, "peer", reply["serverPublicKey"],
                 "allowed-ips", "%s/32,%s/128" % (whoami_addr, probe))
    add_address(t.client, client.ifname, address6)
    t.client.run("ip", "-6", "route", "replace", probe + "/128", "dev", client.ifname)


def send6(t, source, probe, port=9000):
    sock = t.client.socket_in(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.bind((source, 0))
        sock.sendto(b"probe from " + source.encode(), (probe, port))
    finally:
        sock.close()


def test_bridged_ipv6_never_leaves_the_entry_directly(topo):
    t = topo
    direct_sink, bridged_sink = t.sinks
    direct, d = tunnel(t, "dev-direct6", WHOAMI_DIRECT, force_direct=True)
    bridged, b = tunnel(t, "dev-bridge6", INTERNET_ADDR, exitServerId="exit-1")
    try:
        # A bridged session gets no IPv6, and its peer on the entry holds no /128 ...
        assert d["ip6"] and (b["mode"], b["ip6"], b["gateway6"]) == ("bridge", None, None)
        peers = t.entry.wg_peers()
        assert peers[bridged.public_key] == b["ip"]
        assert peers[direct.public_key] == "%s %s" % (d["ip"], d["ip6"])
        # ... so even from the address it would have had (pool6 plus its IPv4 offset), the
        # strongest case, its IPv6 ends at the entry, while the direct client's goes out (NAT66).
        offset = int(ipaddress.ip_address(b["ip"].split("/")[0])) - int(ipaddress.ip_address("10.8.0.0"))
        would_be = str(t.entry.pool6().network_address + offset)
        route_ipv6(t, direct, d, WHOAMI_DIRECT, d["ip6"], PROBE6_DIRECT)
        route_ipv6(t, bridged, b, INTERNET_ADDR, would_be + "/128", PROBE6_BRIDGED)
        sees(t, WHOAMI_DIRECT, SERVER_UPLINK_ADDR, "the direct tunnel up")
        sees(t, INTERNET_ADDR, EXIT_ADDR, "the bridged tunnel up (handshake done)")

        def both_sent():
            send6(t, would_be, PROBE6_BRIDGED)  # each round the bridged datagram goes first
            send6(t, d["ip6"].split("/")[0], PROBE6_DIRECT)
            return len(direct_sink.seen) >= 3

        wait_for(both_sent, timeout=30, interval=0.2, what="the direct client's IPv6 at its probe")
        assert {source for source, _ in direct_sink.seen} == {SERVER_UPLINK_ADDR6}
        assert bridged_sink.seen == [], "a bridged client's IPv6 left the entry directly"
    finally:
        direct.close()
        bridged.close()
        disconnect(t, "dev-direct6")
        disconnect(t, "dev-bridge6")
    wait_for(t.nothing_bridged, timeout=30, what="nothing bridged after the last disconnect")
