"""Tenant isolation: a client reaches the internet, and nothing else (real packets, namespaces).

One topology for the module:

    client 1 192.0.2.2 ─┐                      ┌─ 203.0.113.62 INTERNET (router; whoami and echo on
                        ├─ SERVER (uplink      │  203.0.113.100; "metadata" 169.254.169.254 on the
    client 2 198.51.100.2┘ 203.0.113.1/26) ────┘  uplink's link, as clouds have it; a "VPC" service
                           │                      10.200.0.5 and 10.200.0.6 behind the router)
                           172.16.5.1 ── LAN 172.16.5.10, 172.16.5.11 (RFC 1918, a second network)

The server runs the stack with ORBMESH_NAT_UPLINK; the clients connect
through the API (client 2 reaches WireGuard over its own underlay) and route
everything through their tunnels.  Echo services (tests/e2e/probes.py) answer
on every target, so each probe that must fail has a control that succeeds:
the same service reached from the server itself, or by a client once a
setting opens it.
"""
import re

import pytest

from wghelper import firewall, settings

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import INTERNET_ADDR, SERVER_UPLINK_ADDR, UPLINK_ROUTER, Internet
from .netns import creator, veth
from .probes import ECHO_PORT, Echo, every, reach
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient

pytestmark = pytest.mark.e2e

GATEWAY = "10.8.0.1"
METADATA = "169.254.169.254"
LAN_HOST, LAN_OTHER = "172.16.5.10", "172.16.5.11"
VPC_HOST, VPC_OTHER = "10.200.0.5", "10.200.0.6"
UNDERLAY2, CLIENT2_UNDERLAY = "198.51.100.1", "198.51.100.2"
TABLE = "orbmesh"


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)

        self.echoes = []
        self.server, cli1, self.cli2, self.lan = netns("srv"), netns("cli1"), netns("cli2"), netns("lan")
        veth(self.server, SERVER_ADDR + "/24", cli1, CLIENT_ADDR + "/24")
        veth(self.server, UNDERLAY2 + "/24", self.cli2, CLIENT2_UNDERLAY + "/24")
        lan_if, _ = veth(self.server, "172.16.5.1/24", self.lan, LAN_HOST + "/24")
        self.lan.run("ip", "address", "add", LAN_OTHER + "/32", "dev", "lo")
        # Routed both ways, as a LAN of the host would be: only the firewall stands between it and the clients.
        self.lan.run("ip", "route", "add", "default", "via", "172.16.5.1")
        self.server.run("sysctl", "-w", "net/ipv4/conf/%s/forwarding=1" % lan_if)
        self.internet = Internet(netns, self.server)
        for addr in (METADATA, VPC_HOST, VPC_OTHER):
            self.internet.ns.run("ip", "address", "add", addr + "/32", "dev", "lo")
        self.server.run("ip", "route", "add", "10.200.0.0/24", "via", UPLINK_ROUTER)
        self.server.run("ip", "route", "add", METADATA + "/32", "dev", self.internet.uplink)
        self.stack = Stack(self.server, cli1, tmp, workers=1)
        self.stack.env["ORBMESH_NAT_UPLINK"] = self.internet.uplink
        # The rules of a node whose resolver runs (an echo stands in for it on port 53).
        self.stack.env["ORBMESH_DNS_RESOLVER"] = "on"

    def start(self):
        self.stack.start_helper()
        self.stack.start_app()
        self.clients = [self._client(self.stack.client, "c1", None), self._client(self.cli2, "c2", UNDERLAY2)]
        self.addr1, self.addr2 = [body["ip"].split("/")[0] for _, body, _ in self.clients]
        for ns, addrs in ((self.internet.ns, [INTERNET_ADDR, UPLINK_ROUTER, METADATA, VPC_HOST, VPC_OTHER]),
                          (self.lan, [LAN_HOST, LAN_OTHER]),
                          (self.server, [GATEWAY, SERVER_UPLINK_ADDR, UNDERLAY2]),
                          (self.stack.client, [self.addr1]), (self.cli2, [self.addr2])):
            self.echoes.append(Echo(ns, addrs))
        self.echoes.append(Echo(self.server, [GATEWAY, SERVER_UPLINK_ADDR], port=53))  # "DNS"
        self.echoes.append(Echo(self.internet.ns, [METADATA], port=80))

    def _client(self, ns, name, endpoint):
        client = WgClient(ns, "omi" + name + self.stack.interface[-6:])
        status, body = self.stack.connect("iso-user", "iso-" + name, client.public_key)
        assert status == 200, body
        endpoint = "%s:51820" % endpoint if endpoint else body["serverEndpoint"]
        client.configure(server_public_key=body["serverPublicKey"], endpoint=endpoint, address_cidr=body["ip"],
                         allowed_ips=["0.0.0.0/0"], mtu=body["mtu"], keepalive=body["keepalive"])
        return client, body, endpoint

    def close(self):
        for echo in self.echoes:
            echo.close()
        for client, _, _ in getattr(self, "clients", []):
            client.close()
        self.stack.close()
        self.internet.close()

    # --- the server's side -----------------------------------------------------

    def restart_helper(self, **env):
        """A helper restart with `env` settings added; the clients then handshake again."""
        self.stack.env.update({"ORBMESH_" + name: value for name, value in env.items()})
        self.stack.stop_helper()
        self.stack.start_helper()
        self.new_sessions()

    def new_sessions(self):
        """Make each client handshake at once instead of after ~15 s of silence (see test_nat_e2e)."""
        for client, body, endpoint in self.clients:
            wait_for(lambda: client.public_key in self.stack.wg_peers(), timeout=30, what="peer back on the server")
            key = body["serverPublicKey"]
            client.ns.run("wg", "set", client.ifname, "peer", key, "remove")
            client.ns.run("wg", "set", client.ifname, "peer", key, "endpoint", endpoint, "allowed-ips", "0.0.0.0/0",
                          "persistent-keepalive", "25")
        self.internet_works()

    def internet_works(self):
        """The first control of every test: both clients reach the internet, NATed."""
        for client, _, _ in self.clients:
            wait_for(lambda: self.internet.whoami_from(client.ns, timeout=3) == SERVER_UPLINK_ADDR, timeout=40,
                     interval=0.3, what="whoami through the tunnel of %s" % client.ifname)

    def listed(self):
        """The table with its handles (each definition of the table gets a new one), or None."""
        out = self.server.run("nft", "-a", "list", "table", "inet", TABLE, check=False)
        return out.stdout if out.returncode == 0 else None

    def handle(self):
        match = re.match(r"table inet %s \{ # handle ([0-9]+)" % TABLE, self.listed() or "")
        return int(match.group(1)) if match else None

    def expected(self):
        local = firewall.connected(self.server.run("ip", "-o", "address", "show").stdout)
        env = dict(self.stack.env, ORBMESH_POOL6=str(self.stack.pool6() or "off"))
        return firewall.render(settings.load(env), (), local)

    def one_copy_as_rendered(self):
        assert re.sub(r" # handle [0-9]+", "", self.listed()) == self.expected()
        assert self.server.run("nft", "list", "tables").stdout.split().count(TABLE) == 1


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    requirements("nft", "sysctl", "ping")
    made, sockets_before, t = [], _wireguard_sockets(), None
    try:
        t = Topology(made, tmp_path_factory.mktemp("isolation"))
        t.start()
        yield t
    finally:
        if t is not None:
            t.close()
        inodes = {ns.inode for ns in made}
        for ns in reversed(made):
            ns.delete()
        _remove_dead_sockets(_wireguard_sockets() - sockets_before)
        assert not wireguard_go_in(inodes), "wireguard-go left running"


def blocked_by_default(t):
    """What no client reaches by default, from client 1 and client 2 (the API on the underlay of client 1)."""
    from_1 = every(t.addr2, METADATA, VPC_HOST, LAN_HOST, LAN_OTHER, UPLINK_ROUTER, SERVER_UPLINK_ADDR, UNDERLAY2)
    from_1 += [("tcp", METADATA, 80), ("tcp", GATEWAY, ECHO_PORT), ("udp", GATEWAY, ECHO_PORT),
               ("udp", SERVER_UPLINK_ADDR, 53), ("tcp", SERVER_UPLINK_ADDR, 53)]
    from_2 = every(t.addr1) + [("tcp", SERVER_ADDR, 8080)]
    return reach(t.stack.client, from_1), reach(t.cli2, from_2)


def test_a_client_reaches_the_internet_and_nothing_else(topo):
    t = topo
    t.internet_works()
    t.one_copy_as_rendered()
    # Controls: the internet by ping, TCP and UDP, the gateway's ping and DNS;
    # the server itself reaches the metadata service, the VPC and the LAN; the
    # API answers on the underlay.
    assert all(reach(t.stack.client, every(INTERNET_ADDR) + [("ping", GATEWAY), ("udp", GATEWAY, 53),
                                                           ("tcp", GATEWAY, 53)]).values())
    assert all(reach(t.cli2, every(INTERNET_ADDR)).values())
    assert all(reach(t.server, [("tcp", METADATA, 80)] + every(METADATA, VPC_HOST, LAN_HOST, LAN_OTHER)).values())
    assert t.stack.request("GET", "/health")[0] == 200
    # Probes: other clients, the metadata service, RFC 1918 behind the uplink
    # and on the LAN, the uplink's own network (its router), the server's other
    # addresses, the gateway's other ports, the API.
    from_1, from_2 = blocked_by_default(t)
    assert not any(from_1.values()), [target for target, ok in from_1.items() if ok]
    assert not any(from_2.values()), [target for target, ok in from_2.items() if ok]


def test_settings_open_what_they_say_and_no_more(topo):
    t = topo
    try:
        t.restart_helper(CLIENT_TO_CLIENT="on", ALLOWED_DESTINATIONS=VPC_HOST + "/32",
                         CLIENT_NODE_PORTS=str(ECHO_PORT), DNS_RESOLVER="off")
        t.one_copy_as_rendered()
        opened = reach(t.stack.client, every(t.addr2, VPC_HOST) + [("tcp", SERVER_UPLINK_ADDR, ECHO_PORT),
                                                                  ("tcp", GATEWAY, ECHO_PORT), ("ping", GATEWAY)])
        opened.update(reach(t.cli2, every(t.addr1)))
        assert all(opened.values()), [target for target, ok in opened.items() if not ok]
        still = reach(t.stack.client, every(VPC_OTHER, LAN_HOST, METADATA, UPLINK_ROUTER) + [
            ("udp", SERVER_UPLINK_ADDR, ECHO_PORT), ("udp", GATEWAY, 53), ("tcp", GATEWAY, 53)])
        assert not any(still.values()), [target for target, ok in still.items() if ok]
    finally:
        for name in ("CLIENT_TO_CLIENT", "ALLOWED_DESTINATIONS", "CLIENT_NODE_PORTS"):
            t.stack.env.pop("ORBMESH_" + name, None)
        t.stack.env["ORBMESH_DNS_RESOLVER"] = "on"


@pytest.mark.parametrize("how", ["helper restart", "re-created interface"])
def test_the_same_after_a_restart_with_one_copy_of_each_rule(topo, how):
    t = topo
    before = t.handle()
    if how == "helper restart":  # also back to the defaults after the settings test
        t.restart_helper()
    else:
        t.server.run("ip", "link", "del", "dev", t.stack.interface)
        # The watcher re-creates the link, and the table is written again (a new handle).
        wait_for(lambda: t.handle() not in (None, before), timeout=30, what="the table written again")
        t.new_sessions()
    assert t.handle() not in (None, before)
    t.one_copy_as_rendered()
    reached = reach(t.stack.client, every(INTERNET_ADDR) + [("ping", GATEWAY)])
    assert all(reached.values()), reached
    from_1, from_2 = blocked_by_default(t)
    assert not any(from_1.values()), [target for target, ok in from_1.items() if ok]
    assert not any(from_2.values()), [target for target, ok in from_2.items() if ok]
