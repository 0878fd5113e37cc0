"""Tenant isolation: a client reaches the internet, and nothing else (real packets, namespaces, IPv4 and IPv6).

One topology for the module:

    client 1 192.0.2.2 ─┐                      ┌─ 203.0.113.62, 2001:db8:113::62 INTERNET (router; whoami and echo
                        ├─ SERVER (uplink      │  on 203.0.113.100 and 2001:db8:114::100; a public neighbour on the
    client 2 198.51.100.2┘ 203.0.113.1/26,     │  uplink's own subnet, 203.0.113.30 and 2001:db8:113::30;
                           2001:db8:113::1/64)─┘  "metadata" 169.254.169.254 on the uplink's link, as clouds have
                           │                      it; a "VPC" service 10.200.0.5 and 10.200.0.6 behind the router;
                           │                      hosts in the ranges that are not the internet: NAT64, 6to4,
                           │                      discard-only, IETF protocol assignments, benchmarking)
                           172.16.5.1, fd00:5::1 ── LAN 172.16.5.10, 172.16.5.11, fd00:5::10 (a private network
                                                    connected to the server)

The server runs the stack with ORBMESH_NAT_UPLINK and IPv6 forwarding on (as
the operator sets it); the clients connect through the API (client 2 reaches
WireGuard over its own underlay) and route everything, IPv4 and IPv6,
through their tunnels.  Echo services (tests/e2e/probes.py) answer on every
target, so each probe that must fail has a control that succeeds: the same
service reached from the server itself, or by a client once a setting opens
it, or the node's API port beside its other ports.
"""
import json
import re
import time
from pathlib import Path

import pytest

from wghelper import firewall, settings

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import (INTERNET_ADDR, INTERNET_ADDR6, SERVER_UPLINK_ADDR, SERVER_UPLINK_ADDR6, UPLINK_ROUTER,
                       UPLINK_ROUTER6, Internet, add_address)
from .netns import creator, veth
from .probes import ECHO_PORT, Echo, every, reach
from .stack import CLIENT_ADDR, SERVER_ADDR, VENV_BIN, Stack, wait_for
from .wgclient import WgClient

pytestmark = pytest.mark.e2e

GATEWAY = "10.8.0.1"
METADATA = "169.254.169.254"
LAN_HOST, LAN_OTHER, LAN_HOST6 = "172.16.5.10", "172.16.5.11", "fd00:5::10"
VPC_HOST, VPC_OTHER = "10.200.0.5", "10.200.0.6"
UNDERLAY2, CLIENT2_UNDERLAY = "198.51.100.1", "198.51.100.2"
# Other hosts of the uplink's own (public) subnet: the internet, like the router.
NEIGHBOUR, NEIGHBOUR6 = "203.0.113.30", "2001:db8:113::30"
# One host in each range that is not the internet and that a packet can be sent to: NAT64 of 10.0.0.5
# (well-known and local-use), 6to4 of 10.0.0.5, discard-only, IETF protocol assignments, benchmarking.
NOT_INTERNET_HOSTS = ("64:ff9b::a00:5", "64:ff9b:1::a00:5", "2002:a00:5::1", "100::5", "192.0.0.5", "198.18.0.5")
API_PORT = 8443  # ORBMESH_CLIENT_API_PORT's default: nginx's port, open through the tunnel
TABLE = "orbmesh"
EVERYTHING = ["0.0.0.0/0", "::/0"]


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)

        self.echoes = []
        self.tmp = Path(tmp)
        self.server, cli1, self.cli2, self.lan = netns("srv"), netns("cli1"), netns("cli2"), netns("lan")
        veth(self.server, SERVER_ADDR + "/24", cli1, CLIENT_ADDR + "/24")
        veth(self.server, UNDERLAY2 + "/24", self.cli2, CLIENT2_UNDERLAY + "/24")
        lan_if, lan_inside = veth(self.server, "172.16.5.1/24", self.lan, LAN_HOST + "/24")
        add_address(self.server, lan_if, "fd00:5::1/64")
        add_address(self.lan, lan_inside, LAN_HOST6 + "/64")
        self.lan.run("ip", "address", "add", LAN_OTHER + "/32", "dev", "lo")
        # Routed both ways, as a LAN of the host would be: only the firewall stands between it and the clients.
        self.lan.run("ip", "route", "add", "default", "via", "172.16.5.1")
        self.lan.run("ip", "-6", "route", "add", "default", "via", "fd00:5::1")
        self.server.run("sysctl", "-w", "net/ipv4/conf/%s/forwarding=1" % lan_if)
        self.internet = Internet(netns, self.server, ipv6=True)
        self.server.run("sysctl", "-w", "net.ipv6.conf.all.forwarding=1")  # the operator's switch
        inet = self.internet.ns
        for addr in (METADATA, VPC_HOST, VPC_OTHER) + NOT_INTERNET_HOSTS:
            self.internet.beyond(addr)
        for addr in (NEIGHBOUR + "/26", NEIGHBOUR6 + "/64"):
            add_address(inet, self.internet.inside, addr)
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
        (self.addr1, self.addr1_6), (self.addr2, self.addr2_6) = [
            (body["ip"].split("/")[0], body["ip6"].split("/")[0]) for _, body, _ in self.clients]
        self.gateway6 = self.clients[0][1]["gateway6"]
        for ns, addrs in ((self.internet.ns, [INTERNET_ADDR, INTERNET_ADDR6, UPLINK_ROUTER, UPLINK_ROUTER6, NEIGHBOUR,
                                              NEIGHBOUR6, METADATA, VPC_HOST, VPC_OTHER] + list(NOT_INTERNET_HOSTS)),
                          (self.lan, [LAN_HOST, LAN_OTHER, LAN_HOST6]),
                          (self.server, [GATEWAY, self.gateway6, SERVER_UPLINK_ADDR, SERVER_UPLINK_ADDR6, UNDERLAY2]),
                          (self.stack.client, [self.addr1, self.addr1_6]), (self.cli2, [self.addr2, self.addr2_6])):
            self.echoes.append(Echo(ns, addrs))
        self.echoes.append(Echo(self.server, [GATEWAY, self.gateway6, SERVER_UPLINK_ADDR], port=53))  # "DNS"
        self.echoes.append(Echo(self.server, [SERVER_UPLINK_ADDR, SERVER_UPLINK_ADDR6], port=API_PORT))  # "nginx"
        self.echoes.append(Echo(self.internet.ns, [METADATA], port=80))

    def _client(self, ns, name, endpoint):
        client = WgClient(ns, "omi" + name + self.stack.interface[-6:])
        status, body = self.stack.connect("iso-user", "iso-" + name, client.public_key)
        assert status == 200, body
        assert body["allowedIPs"] == EVERYTHING and body["ip6"], body
        endpoint = "%s:51820" % endpoint if endpoint else body["serverEndpoint"]
        client.configure(server_public_key=body["serverPublicKey"], endpoint=endpoint, address_cidr=body["ip"],
                         address6_cidr=body["ip6"], allowed_ips=EVERYTHING, mtu=body["mtu"],
                         keepalive=body["keepalive"])
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
            client.ns.run("wg", "set", client.ifname, "peer", key, "endpoint", endpoint, "allowed-ips",
                          ",".join(EVERYTHING), "persistent-keepalive", "25")
        self.internet_works()

    def internet_works(self):
        """The first control of every test: both clients reach the internet, NATed, over IPv4 and IPv6."""
        for client, _, _ in self.clients:
            for url, seen in ((self.internet.url, SERVER_UPLINK_ADDR), (self.internet.url6, SERVER_UPLINK_ADDR6)):
                wait_for(lambda: self.internet.whoami_from(client.ns, timeout=3, url=url) == seen, timeout=40,
                         interval=0.3, what="whoami %s through the tunnel of %s" % (url, client.ifname))

    def forwarding(self, ifname, family="ipv4"):
        return self.server.run("sysctl", "-n", "net/%s/conf/%s/forwarding" % (family, ifname)).stdout.strip()

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
    """What no client reaches by default, from client 1 and client 2 (the app's own port on the underlay of
    client 1), over IPv4 and IPv6."""
    from_1 = every(t.addr2, t.addr2_6, METADATA, VPC_HOST, LAN_HOST, LAN_OTHER, LAN_HOST6, SERVER_UPLINK_ADDR,
                   SERVER_UPLINK_ADDR6, UNDERLAY2)
    from_1 += [("tcp", METADATA, 80), ("tcp", GATEWAY, ECHO_PORT), ("udp", GATEWAY, ECHO_PORT),
               ("tcp", t.gateway6, ECHO_PORT), ("udp", t.gateway6, ECHO_PORT),
               ("udp", SERVER_UPLINK_ADDR, 53), ("tcp", SERVER_UPLINK_ADDR, 53)]
    from_2 = every(t.addr1, t.addr1_6) + [("tcp", SERVER_ADDR, 8080)]
    return reach(t.stack.client, from_1), reach(t.cli2, from_2)


def none(found):
    """found (of reach()) with nothing reached; the message lists what was."""
    assert not any(found.values()), [target for target, ok in found.items() if ok]


def every_one(found):
    assert all(found.values()), [target for target, ok in found.items() if not ok]


def reaches_the_node_only_where_it_may(t, ns):
    """Controls a client keeps even when nothing else passes: the gateways' ping and DNS, the API port."""
    every_one(reach(ns, [("ping", GATEWAY), ("ping", t.gateway6), ("udp", GATEWAY, 53), ("tcp", t.gateway6, 53),
                         ("tcp", SERVER_UPLINK_ADDR, API_PORT), ("tcp", SERVER_UPLINK_ADDR6, API_PORT)]))


def test_a_client_reaches_the_internet_and_nothing_else(topo):
    t = topo
    t.internet_works()
    t.one_copy_as_rendered()
    # Controls: the internet by ping, TCP and UDP, over IPv4 and IPv6; the gateways' ping and DNS; the node's
    # API port; the server itself reaches the metadata service, the VPC and the LAN; the app answers on
    # the underlay.
    every_one(reach(t.stack.client, every(INTERNET_ADDR, INTERNET_ADDR6)))
    every_one(reach(t.cli2, every(INTERNET_ADDR, INTERNET_ADDR6)))
    for ns in (t.stack.client, t.cli2):
        reaches_the_node_only_where_it_may(t, ns)
    every_one(reach(t.server, [("tcp", METADATA, 80)] + every(METADATA, VPC_HOST, LAN_HOST, LAN_OTHER, LAN_HOST6)))
    assert t.stack.request("GET", "/health")[0] == 200
    # Probes: other clients, the metadata service, RFC 1918 behind the uplink
    # and on the LAN (and the LAN's unique-local IPv6), the server's other
    # addresses and ports (its uplink addresses, the gateways' other ports, the app's port).
    from_1, from_2 = blocked_by_default(t)
    none(from_1)
    none(from_2)


def test_a_public_neighbour_answers_and_what_is_not_the_internet_does_not(topo):
    """A connected network is blocked only when it is not the internet: the uplink's public subnet is."""
    t = topo
    public = every(NEIGHBOUR, NEIGHBOUR6, UPLINK_ROUTER, UPLINK_ROUTER6)
    private = every(LAN_HOST, LAN_HOST6, *NOT_INTERNET_HOSTS)
    # Controls: the server itself reaches every one of them (so each is up and routed).
    every_one(reach(t.server, public + private))
    for ns in (t.stack.client, t.cli2):
        every_one(reach(ns, public))  # other hosts of the uplink's subnet, IPv4 and IPv6, as the internet
        none(reach(ns, private))      # a private connected network; NAT64, 6to4, discard-only, 192.0.0/24, 198.18/15
    table = t.listed()
    assert "203.0.113." not in table and "2001:db8" not in table  # the uplink's networks are not in the drops
    assert "172.16.0.0/12" in table and "64:ff9b::/96" in table


def test_settings_open_what_they_say_and_no_more(topo):
    t = topo
    try:
        t.restart_helper(CLIENT_TO_CLIENT="on", ALLOWED_DESTINATIONS=VPC_HOST + "/32",
                         CLIENT_NODE_PORTS=str(ECHO_PORT), DNS_RESOLVER="off", CLIENT_API_PORT="off")
        t.one_copy_as_rendered()
        opened = reach(t.stack.client, every(t.addr2, t.addr2_6, VPC_HOST) + [
            ("tcp", SERVER_UPLINK_ADDR, ECHO_PORT), ("tcp", SERVER_UPLINK_ADDR6, ECHO_PORT),
            ("tcp", GATEWAY, ECHO_PORT), ("ping", GATEWAY)])
        opened.update(reach(t.cli2, every(t.addr1, t.addr1_6)))
        every_one(opened)
        none(reach(t.stack.client, every(VPC_OTHER, LAN_HOST, METADATA) + [
            ("udp", SERVER_UPLINK_ADDR, ECHO_PORT), ("udp", GATEWAY, 53), ("tcp", GATEWAY, 53),
            ("tcp", SERVER_UPLINK_ADDR, API_PORT), ("tcp", SERVER_UPLINK_ADDR6, API_PORT)]))
    finally:
        for name in ("CLIENT_TO_CLIENT", "ALLOWED_DESTINATIONS", "CLIENT_NODE_PORTS", "CLIENT_API_PORT"):
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
    every_one(reach(t.stack.client, every(INTERNET_ADDR, INTERNET_ADDR6) + [("ping", GATEWAY)]))
    from_1, from_2 = blocked_by_default(t)
    none(from_1)
    none(from_2)


# A fault for `orbmesh-wghelper down`: deleting a link fails; every other ip command is the real one.
IP_THAT_CANNOT_DELETE = """#!/bin/sh
case " $* " in
*" link del "*) echo "RTNETLINK answers: Operation not permitted" >&2; exit 2 ;;
esac
exec %s "$@"
"""


def test_a_failed_start_and_a_down_that_fails_halfway_leave_clients_no_path(topo, tmp_path):
    """The review's sequence: a healthy helper, then a start that cannot finish (ORBMESH_NAT_UPLINK names no
    link), then a `down` that cannot remove the interface.  Clients keep their interface and sessions, and
    reach the gateways and the API port, never each other, the node's other ports or the internet."""
    t = topo
    t.internet_works()
    peers = dict(t.stack.wg_peers())
    uplink = t.internet.uplink

    def no_path():
        for ns in (t.stack.client, t.cli2):
            reaches_the_node_only_where_it_may(t, ns)  # controls
        none(reach(t.stack.client, every(t.addr2, t.addr2_6, INTERNET_ADDR, INTERNET_ADDR6) + [
            ("tcp", SERVER_UPLINK_ADDR, ECHO_PORT), ("tcp", SERVER_UPLINK_ADDR6, ECHO_PORT),
            ("tcp", t.gateway6, ECHO_PORT), ("tcp", GATEWAY, ECHO_PORT)]))
        none(reach(t.cli2, every(t.addr1, t.addr1_6, INTERNET_ADDR6) + [("tcp", SERVER_ADDR, 8080)]))
        assert t.stack.wg_peers() == peers  # the interface, as it was: its clients keep their sessions

    try:
        # Healthy: the same probes blocked, the internet reached (above), the controls answered.
        reaches_the_node_only_where_it_may(t, t.stack.client)
        none(reach(t.stack.client, every(t.addr2, t.addr2_6) + [("tcp", SERVER_UPLINK_ADDR6, ECHO_PORT),
                                                               ("tcp", t.gateway6, ECHO_PORT)]))

        t.stack.stop_helper()
        t.stack.env["ORBMESH_NAT_UPLINK"] = "eth-typo"
        logged = len(t.stack.helper_log.read_text())
        with open(t.stack.helper_log, "ab") as log:
            proc = t.server.popen([str(VENV_BIN / "orbmesh-wghelper")], env=t.stack.env, stdout=log, stderr=log)
        assert proc.wait(timeout=60) == 1
        assert "cannot stat /proc/sys/net/ipv4/conf/eth-typo/forwarding" in t.stack.helper_log.read_text()[logged:]
        assert 'oifname "eth-typo"' in t.listed()  # the table stays (its only way out: a link that is not there)
        assert t.forwarding(t.stack.interface) == t.forwarding(uplink) == "0"  # what the helper turned on: off
        assert t.forwarding("all", "ipv6") == "1"  # the operator's: IPv6 still forwards, the filter holds it
        no_path()

        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "ip").write_text(IP_THAT_CANNOT_DELETE % t.server.run("sh", "-c", "command -v ip").stdout.strip())
        (bin_dir / "ip").chmod(0o755)
        env = dict(t.stack.env, PATH="%s:%s" % (bin_dir, t.stack.env["PATH"]))
        down = t.server.run(str(VENV_BIN / "orbmesh-wghelper"), "down", env=env, check=False)
        assert down.returncode == 1 and "Operation not permitted" in down.stderr, down.stderr
        assert 'oifname "eth-typo"' in t.listed()  # the link is there, so is its filter
        no_path()
    finally:
        t.stack.env["ORBMESH_NAT_UPLINK"] = uplink
    # Control: the same node with its setting fixed is healthy again, without a `down`.
    t.stack.start_helper()
    t.new_sessions()
    t.one_copy_as_rendered()
    assert t.forwarding(t.stack.interface) == "1"


def test_an_app_disconnects_through_its_tunnel_on_the_apps_own_port(topo):
    """Where the app serves directly (./scripts/run-local sets ORBMESH_CLIENT_API_PORT to its port), a client
    whose tunnel carries the node's address calls /wireguard/disconnect through it and gets its answer."""
    t = topo
    client, body, _ = t.clients[1]  # client 2 reaches the app's address (192.0.2.1) only through its tunnel
    none(reach(t.cli2, [("tcp", SERVER_ADDR, 8080)]))  # the app's port is not the API port by default ...
    t.restart_helper(CLIENT_API_PORT="8080")
    try:
        every_one(reach(t.cli2, [("tcp", SERVER_ADDR, 8080)]))  # ... and is once it is
        none(reach(t.cli2, [("tcp", SERVER_UPLINK_ADDR, API_PORT)]))  # and 8443 no longer
        started = time.monotonic()
        status, _, answer = t.cli2.http("POST", "http://%s:8080/wireguard/disconnect" % SERVER_ADDR, timeout=5,
                                        headers={"Authorization": "Bearer " + t.stack.token("iso-user", "iso-c2")})
        took = time.monotonic() - started
        assert (status, json.loads(answer)["success"]) == (200, True), answer
        assert took < 1.0, took  # the answer came back through the tunnel it removes
        wait_for(lambda: client.public_key not in t.stack.wg_peers(), timeout=10, what="its peer gone after")
        print("disconnect through the tunnel on the app's own port: %.3f s" % took)
    finally:
        t.stack.env.pop("ORBMESH_CLIENT_API_PORT", None)
