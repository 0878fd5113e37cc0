"""Dual stack end to end: real WireGuard clients, the real helper and app, NAT66 to an IPv6 internet.

One topology for the whole module:

    client 192.0.2.2 ── 192.0.2.1 SERVER 203.0.113.1, 2001:db8:113::1 ── INTERNET 203.0.113.100, 2001:db8:113::100
                                                                         (whoami :8000 on both)

The server runs with its defaults for IPv6 (ORBMESH_POOL6 unset: the
unique-local /64 the helper makes once) and NAT on its uplink.  The only
thing set by hand is what the operator sets (docs/operations.md):
net.ipv6.conf.all.forwarding=1, inside the server namespace.
"""
import ipaddress
from pathlib import Path

import pytest

from wghelper.settings import ULA

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import INTERNET_ADDR6, SERVER_UPLINK_ADDR, SERVER_UPLINK_ADDR6, Internet
from .netns import creator, unique_ifname, veth
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient, keypair

pytestmark = pytest.mark.e2e

POOL = ipaddress.ip_network("10.8.0.0/16")


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)

        self.server, self.client = netns("srv6"), netns("cli6")
        veth(self.server, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        self.internet = Internet(netns, self.server, ipv6=True)
        self.server.run("sysctl", "-w", "net.ipv6.conf.all.forwarding=1")
        self.stack = Stack(self.server, self.client, tmp)
        self.stack.env["ORBMESH_NAT_UPLINK"] = self.internet.uplink

    @property
    def pool6_file(self):
        return Path(self.stack.env["ORBMESH_HELPER_STATE_DIR"]) / "pool6"

    def ip6_of(self, ip):
        """Where one row's IPv6 address must be: pool6 plus the IPv4 address's offset in the pool."""
        offset = int(ipaddress.ip_address(ip.split("/")[0])) - int(POOL.network_address)
        return "%s/128" % (self.stack.pool6().network_address + offset)


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    requirements("nft", "sysctl")
    made = []
    sockets_before = _wireguard_sockets()
    t = None
    try:
        t = Topology(made, tmp_path_factory.mktemp("ipv6"))
        with t.stack.running():
            yield t
    finally:
        if t is not None:
            t.internet.close()
        inodes = {ns.inode for ns in made}
        for ns in reversed(made):
            ns.delete()
        _remove_dead_sockets(_wireguard_sockets() - sockets_before)
        assert not wireguard_go_in(inodes), "wireguard-go left running"


def dual_stack_client(t, device):
    """A client that applies the connect response as it is: both addresses, all of IPv4 and IPv6."""
    client = WgClient(t.client, unique_ifname("omc6"))
    status, body = t.stack.connect("v6-user", device, client.public_key)
    assert status == 200, body
    assert body["allowedIPs"] == ["0.0.0.0/0", "::/0"]
    client.configure(server_public_key=body["serverPublicKey"], endpoint=body["serverEndpoint"],
                     address_cidr=body["ip"], address6_cidr=body["ip6"], allowed_ips=body["allowedIPs"],
                     mtu=body["mtu"], keepalive=body["keepalive"])
    return client, body


def test_client_pings_the_ipv6_gateway_and_the_internet_sees_nat66(topo):
    t = topo
    client, body = dual_stack_client(t, "v6-one")
    try:
        pool6 = t.stack.pool6()
        assert pool6.prefixlen == 64 and pool6.subnet_of(ULA)  # the one the helper made and kept
        assert body["ip"] == "10.8.0.2/32" and body["ip6"] == t.ip6_of(body["ip"])
        assert body["gateway6"] == str(pool6.network_address + 1)
        # The stack runs no resolver here (tests/e2e/test_dns_e2e.py has the IPv6 gateway's resolver).
        assert body["dns"] == ["1.1.1.1"]
        assert client.ping(body["gateway6"], count=3, timeout=3), "no IPv6 reply through the tunnel"
        assert client.ping(body["gateway"], count=1, timeout=3)

        # NAT66: the internet sees the server's uplink address, never the client's own.
        seen6 = wait_for(lambda: t.internet.whoami_from(t.client, timeout=3, url=t.internet.url6),
                         timeout=30, interval=0.3, what="whoami over IPv6")
        assert seen6 == SERVER_UPLINK_ADDR6 and seen6 != body["ip6"].split("/")[0]
        assert t.internet.whoami_from(t.client, timeout=3) == SERVER_UPLINK_ADDR  # and IPv4 beside it
        table = t.server.run("nft", "list", "table", "inet", "orbmesh").stdout
        assert 'ip6 saddr %s masquerade' % pool6 in table

        # The other way is closed: with a route to pool6, the internet still cannot reach the
        # client (only replies come back in), while its reply to the client's own ping did.
        t.internet.ns.run("ip", "-6", "route", "replace", str(pool6), "via", SERVER_UPLINK_ADDR6)
        probe = t.internet.ns.run("ping", "-n", "-c", "2", "-W", "1", body["ip6"].split("/")[0], check=False)
        assert probe.returncode != 0, "a tunnel client answered from the internet"
        assert client.ping(INTERNET_ADDR6, count=1, timeout=3)
    finally:
        client.close()


def test_two_clients_have_their_ipv4_offsets_and_keep_them_across_restarts(topo):
    t = topo
    client, first = dual_stack_client(t, "v6-two")
    second_key = keypair()[1]
    status, second = t.stack.connect("v6-user", "v6-three", second_key)
    assert status == 200, second
    try:
        assert first["ip6"] != second["ip6"] and first["ip"] != second["ip"]
        for body in (first, second):
            assert body["ip6"] == t.ip6_of(body["ip"])
        expected = t.stack.db_peers()  # the /32 and /128 of every row
        assert t.stack.wg_peers() == expected and expected[second_key] == "%s %s" % (second["ip"], second["ip6"])
        made = t.pool6_file.read_text()

        t.stack.stop_app()
        t.stack.stop_helper()
        t.stack.start_helper()
        t.stack.start_app()
        assert t.pool6_file.read_text() == made  # never made again
        wait_for(lambda: t.stack.wg_peers() == expected, timeout=30, what="both addresses back on the interface")
        status, health = t.stack.call("GET", "/health", api_key=t.stack.api_key)
        assert status == 200 and health["wireguard"]["gateway6"] == first["gateway6"]
        status, again = t.stack.connect("v6-user", "v6-three", second_key)
        assert status == 200 and (again["ip"], again["ip6"]) == (second["ip"], second["ip6"])
        # The re-created interface holds the IPv6 gateway again: the first client reaches it.
        key = first["serverPublicKey"]
        t.client.run("wg", "set", client.ifname, "peer", key, "remove")
        t.client.run("wg", "set", client.ifname, "peer", key, "endpoint", first["serverEndpoint"],
                     "allowed-ips", "0.0.0.0/0,::/0", "persistent-keepalive", str(first["keepalive"]))
        assert wait_for(lambda: client.ping(first["gateway6"], count=1, timeout=2), timeout=30,
                        what="IPv6 ping after the restarts")
    finally:
        client.close()


def test_bad_ipv6_input_is_a_4xx_and_changes_nothing(topo):
    t = topo
    pool6 = t.stack.pool6()
    own6, other6 = t.ip6_of("10.8.7.42"), t.ip6_of("10.8.7.43")
    body = {"userUuid": "orbnet-v6", "publicKey": keypair()[1], "assignedIP": "10.8.7.42",
            "allowedIPs": "10.8.7.42/32"}
    before = (t.stack.db_peers(), t.stack.wg_peers())
    for bad in ({"assignedIP": "2001:db8::2a", "allowedIPs": "2001:db8::2a/128"},  # IPv6, outside the pool
                {"assignedIP": own6.split("/")[0], "allowedIPs": own6},            # IPv6, inside pool6
                {"allowedIPs": "10.8.7.42/32,%s" % pool6},                           # a /64
                {"allowedIPs": "10.8.7.42/32,%s" % other6},                          # another row's /128
                {"allowedIPs": "10.8.7.42/32,::/0"}):
        status, reply = t.stack.call("POST", "/wireguard/add-peer", dict(body, **bad), api_key=t.stack.api_key)
        assert status == 400 and reply["error"]["code"] == "VALIDATION_ERROR", (bad, reply)
        assert (t.stack.db_peers(), t.stack.wg_peers()) == before, bad

    # The control: its own /128 is accepted, and the interface holds both of its addresses.
    status, reply = t.stack.call("POST", "/wireguard/add-peer", dict(body, allowedIPs="10.8.7.42/32," + own6),
                                 api_key=t.stack.api_key)
    assert status == 200, reply
    assert t.stack.wg_peers()[body["publicKey"]] == "10.8.7.42/32 " + own6
    status, _ = t.stack.call("POST", "/wireguard/remove-peer", {"userUuid": "orbnet-v6"}, api_key=t.stack.api_key)
    assert status == 200 and (t.stack.db_peers(), t.stack.wg_peers()) == before
