"""The node's resolver keeps to the firewall's rules: no queries to private addresses, no private answers.

One topology for the whole module, a lab DNS of its own (no internet):

    client ns ──veth── server ns: helper, gunicorn, Unbound ──uplink── internet ns
    tunnel 10.8.0.x,    on 10.8.0.1 and 2001:db8:42::1           203.0.113.53: the lab root ("."), authoritative
    2001:db8:42::x      (routed ORBMESH_POOL6, DNSSEC off,       203.0.113.54, 2001:db8:114::54: the servers of
                         no NAT)                                 pub.example and pub6.example
                          │ 10.99.0.1, fd99::1
                          └──veth── lan ns: 10.99.0.5, fd99::5: the servers of corp.example and corp6.example,
                                    a "LAN" the node is connected to

The resolver runs the config `orbmesh-wg dns-config` renders, with one
change: its root is the lab root (a stub zone for "."), so it resolves
iteratively and follows the lab's delegations.  The lab root delegates
corp.example and corp6.example to the LAN servers (glue 10.99.0.5 and
fd99::5), pub.example and pub6.example to public servers (the controls),
and answers rebinding names with private addresses and addresses of the
client pools.  Every lab server logs the queries it gets.
"""
import re

import pytest

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import SERVER_UPLINK_ADDR, SERVER_UPLINK_ADDR6, DnsServer, Internet, add_address
from .netns import creator, veth
from .stack import CLIENT_ADDR, GATEWAY, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient

pytestmark = pytest.mark.e2e

POOL6 = "2001:db8:42::/64"  # routed: global, outside NOT_INTERNET; only the pool rule covers it
ROOT, PUB, PUB6 = "203.0.113.53", "203.0.113.54", "2001:db8:114::54"
LAN_NODE, LAN_NODE6, LAN, LAN6 = "10.99.0.1", "fd99::1", "10.99.0.5", "fd99::5"
LOOPBACK_UPSTREAM = "127.0.0.53"

ROOT_ZONE = """$ORIGIN .
$TTL 60
@ IN SOA a.root.lab. hostmaster.lab. 1 3600 600 86400 60
@ IN NS a.root.lab.
a.root.lab. IN A {root}
www.example. IN A 198.51.100.80
www.example. IN AAAA 2001:db8:80::80
meta.rebind.example. IN A 169.254.169.254
meta.rebind.example. IN AAAA fd00:ec2::254
pool.rebind.example. IN A 10.8.0.9
pool.rebind.example. IN AAAA 2001:db8:42::9
corp.example. IN NS ns.corp.example.
ns.corp.example. IN A {lan}
corp6.example. IN NS ns.corp6.example.
ns.corp6.example. IN AAAA {lan6}
pub.example. IN NS ns.pub.example.
ns.pub.example. IN A {pub}
pub6.example. IN NS ns.pub6.example.
ns.pub6.example. IN AAAA {pub6}
""".format(root=ROOT, lan=LAN, lan6=LAN6, pub=PUB, pub6=PUB6)
NORMAL = {("www.example", "A"): ["198.51.100.80"], ("www.example", "AAAA"): ["2001:db8:80::80"]}
REBINDING = {("meta.rebind.example", "A"): "169.254.169.254", ("meta.rebind.example", "AAAA"): "fd00:ec2::254",
             ("pool.rebind.example", "A"): "10.8.0.9", ("pool.rebind.example", "AAAA"): "2001:db8:42::9"}
# The LAN servers answer with public addresses: only the rule against querying them keeps these from a client.
PRIVATE_DELEGATIONS = {("www.corp.example", "A"): ["198.51.100.99"], ("www.corp6.example", "AAAA"): ["2001:db8:99::99"]}
PUBLIC_DELEGATIONS = {("www.pub.example", "A"): ["198.51.100.97"], ("www.pub6.example", "AAAA"): ["2001:db8:97::97"]}
LAB_ROOT = '\nstub-zone:\n    name: "."\n    stub-addr: %s\n' % ROOT


def with_lab_root(text):
    """The rendered config, resolving from the lab root instead of the internet's."""
    return text + LAB_ROOT


def without_the_rules(text):
    """The rendered config as it was before these rules: no do-not-query-address, no private-address."""
    kept = [line for line in text.splitlines() if not line.strip().startswith(("do-not-query", "private-address"))]
    return with_lab_root("\n".join(kept) + "\n")


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)
        self.server, self.client, self.lan = netns("rbsrv"), netns("rbcli"), netns("rblan")
        veth(self.server, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        self.internet = Internet(netns, self.server, ipv6=True)
        for address in (ROOT, PUB, PUB6):
            self.internet.beyond(address)
        node_side, lan_side = veth(self.server, LAN_NODE + "/24", self.lan, LAN + "/24")
        add_address(self.server, node_side, LAN_NODE6 + "/64")
        add_address(self.lan, lan_side, LAN6 + "/64")
        inet, uplinks = self.internet.ns, [SERVER_UPLINK_ADDR]
        self.dns = {
            "root": DnsServer(inet, ROOT, {}, uplinks, tmp, root=ROOT_ZONE),
            "pub": DnsServer(inet, PUB, {"www.pub.example": "198.51.100.97"}, uplinks, tmp),
            "pub6": DnsServer(inet, PUB6, {"www.pub6.example": "2001:db8:97::97"}, [SERVER_UPLINK_ADDR6], tmp),
            # Each also answers a name with a private address, for when the operator makes it the upstream.
            "lan": DnsServer(self.lan, LAN, {"www.corp.example": "198.51.100.99",
                                             "intranet.corp.example": "10.99.0.80"}, [LAN_NODE], tmp),
            "lan6": DnsServer(self.lan, LAN6, {"www.corp6.example": "2001:db8:99::99",
                                               "intranet.corp6.example": "fd99::80"}, [LAN_NODE6], tmp),
            "loopback": DnsServer(self.server, LOOPBACK_UPSTREAM, {"www.local.example": "198.51.100.53",
                                                                   "intranet.local.example": "127.0.0.80"},
                                  ["127.0.0.1"], tmp),
        }
        self.stack = Stack(self.server, self.client, tmp, workers=1)
        self.stack.env.update({"ORBMESH_DNS_RESOLVER": "on", "ORBMESH_DNS_DNSSEC": "off",  # the lab is unsigned
                               "ORBMESH_POOL6": POOL6})
        self.wg = None
        self.reply = None

    def connect_client(self):
        self.wg = WgClient(self.client, "omrb" + self.client.name[-6:])
        status, self.reply = self.stack.connect("rebind-user", "rebind-device", self.wg.public_key)
        assert status == 200, self.reply
        r = self.reply
        self.wg.configure(server_public_key=r["serverPublicKey"], endpoint=r["serverEndpoint"],
                          address_cidr=r["ip"], address6_cidr=r["ip6"], allowed_ips=r["allowedIPs"], mtu=r["mtu"],
                          keepalive=r["keepalive"])
        assert wait_for(lambda: self.wg.ping(GATEWAY, count=1, timeout=2), timeout=30, what="the tunnel")

    @property
    def gateways(self):
        """The client's resolvers, as the connect answer names them: the IPv4 gateway, then the IPv6 one."""
        return [GATEWAY, self.reply["gateway6"]]

    def restart_resolver(self, edit, **env):
        self.stack.stop_resolver()
        self.stack.env.update(env)
        self.stack.start_resolver(edit=edit)

    def close(self):
        if self.wg is not None:
            self.wg.close()
        for server in self.dns.values():
            server.close()
        self.internet.close()


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    requirements("unbound", "dig")
    made = []
    sockets_before = _wireguard_sockets()
    t = None
    try:
        t = Topology(made, tmp_path_factory.mktemp("rebind"))
        for name, server in t.dns.items():
            wait_for(server.ready, what="the lab's DNS server " + name)
        t.stack.start_helper()
        t.stack.start_resolver(edit=with_lab_root)
        t.stack.start_app()
        t.connect_client()
        yield t
    finally:
        if t is not None:
            t.close()
            t.stack.close()
        inodes = {ns.inode for ns in made}
        for ns in reversed(made):
            ns.delete()
        _remove_dead_sockets(_wireguard_sockets() - sockets_before)
        assert not wireguard_go_in(inodes), "wireguard-go left running"


def ask(t, gateway, name, rtype):
    """(status, addresses) a client gets from the node's resolver at `gateway`, through the tunnel."""
    out = t.client.run("dig", "+tries=1", "+time=5", "@" + gateway, name, rtype, check=False, timeout=30).stdout
    status = re.search(r"status: (\w+)", out)
    return (status.group(1) if status else None), re.findall(r"^\S+\.\s+\d+\s+IN\s+(?:A|AAAA)\s+(\S+)$", out, re.M)


def test_a_delegation_to_a_private_address_is_never_queried(topo):
    t = topo
    lan_before = len(t.dns["lan"].askers()), len(t.dns["lan6"].askers())
    for gateway in t.gateways:
        # Controls: the same kind of delegation, to public servers, resolves (over IPv4 and IPv6) ...
        for (name, rtype), addresses in PUBLIC_DELEGATIONS.items():
            assert ask(t, gateway, name, rtype) == ("NOERROR", addresses), (gateway, name)
        # ... and the names delegated to the LAN do not: the client gets no address at all.
        for (name, rtype), addresses in PRIVATE_DELEGATIONS.items():
            status, got = ask(t, gateway, name, rtype)
            assert got == [] and status == "SERVFAIL", (gateway, name, status, got)
    assert set(t.dns["pub"].askers("www.pub.example")) == {SERVER_UPLINK_ADDR}
    assert set(t.dns["pub6"].askers("www.pub6.example")) == {SERVER_UPLINK_ADDR6}
    # The LAN servers got no query from the node, over IPv4 or IPv6 ...
    assert (len(t.dns["lan"].askers()), len(t.dns["lan6"].askers())) == lan_before
    # ... although they are up, answer the node and log what they are asked (controls).
    for server, source, name, before in ((t.dns["lan"], LAN_NODE, "www.corp.example", lan_before[0]),
                                         (t.dns["lan6"], LAN_NODE6, "www.corp6.example", lan_before[1])):
        out = Stack.dig(t.server, server.address, name, source=source)
        assert "status: NOERROR" in out, out
        assert server.askers()[before:] == [source]


def test_private_and_pool_answers_never_reach_a_client(topo):
    t = topo
    # The premise: the client's IPv6 address is in the routed pool, which only the pool rule covers.
    assert t.reply["ip6"].startswith("2001:db8:42::") and t.gateways[1] == "2001:db8:42::1"
    for gateway in t.gateways:
        # Controls: a normal name resolves, IPv4 and IPv6, and local data still answers (the /health probe).
        for (name, rtype), addresses in NORMAL.items():
            assert ask(t, gateway, name, rtype) == ("NOERROR", addresses), (gateway, name, rtype)
        assert ask(t, gateway, "localhost", "A") == ("NOERROR", ["127.0.0.1"])
        assert ask(t, gateway, "localhost", "AAAA") == ("NOERROR", ["::1"])
        # The rebinding names: link-local (the metadata service), unique-local, and both client pools.
        for (name, rtype), address in REBINDING.items():
            status, got = ask(t, gateway, name, rtype)
            assert got == [] and status == "NOERROR", (gateway, name, rtype, status, got)
    # The root was asked and gave the addresses: the resolver removed them.
    for name in ("meta.rebind.example", "pool.rebind.example"):
        assert set(t.dns["root"].askers(name)) == {SERVER_UPLINK_ADDR}, name


def test_the_lab_sees_the_leaks_without_these_rules(topo):
    """Control for the two tests above: the same lab, the config without its two rules, leaks both ways."""
    t = topo
    lan_before = len(t.dns["lan"].askers()), len(t.dns["lan6"].askers())
    t.restart_resolver(without_the_rules)
    try:
        for (name, rtype), address in REBINDING.items():
            assert ask(t, GATEWAY, name, rtype) == ("NOERROR", [address]), (name, rtype)
        for (name, rtype), addresses in PRIVATE_DELEGATIONS.items():
            assert ask(t, GATEWAY, name, rtype) == ("NOERROR", addresses), name
        assert len(t.dns["lan"].askers()) > lan_before[0] and len(t.dns["lan6"].askers()) > lan_before[1]
        assert LAN_NODE in t.dns["lan"].askers("www.corp.example")
        assert LAN_NODE6 in t.dns["lan6"].askers("www.corp6.example")
    finally:
        t.restart_resolver(with_lab_root)
    assert ask(t, GATEWAY, "meta.rebind.example", "A") == ("NOERROR", [])  # the rules are back


@pytest.mark.parametrize("upstream, name, private, address", [
    (LAN, "www.corp.example", "intranet.corp.example", "198.51.100.99"),
    (LAN6, "www.corp6.example", "intranet.corp6.example", "2001:db8:99::99"),
    (LOOPBACK_UPSTREAM, "www.local.example", "intranet.local.example", "198.51.100.53"),
], ids=["rfc1918", "unique-local", "loopback"])
def test_an_upstream_the_operator_names_is_queried_wherever_it_is(topo, upstream, name, private, address):
    """ORBMESH_DNS_UPSTREAM on a private or loopback address: the one exemption from do-not-query-address.
    Its private answers are still removed."""
    t = topo
    server = next(s for s in t.dns.values() if s.address == upstream)
    rtype = "AAAA" if ":" in address else "A"
    asked_before = len(server.askers(name))
    t.restart_resolver(None, ORBMESH_DNS_UPSTREAM=upstream)
    try:
        for gateway in t.gateways:
            assert ask(t, gateway, name, rtype) == ("NOERROR", [address]), gateway
            assert ask(t, gateway, private, rtype) == ("NOERROR", []), gateway
        assert len(server.askers(name)) > asked_before
        # The upstream answers the private name, so the removal is the resolver's (control).
        assert server.askers(private), "the upstream was not asked for " + private
    finally:
        t.stack.env.pop("ORBMESH_DNS_UPSTREAM")
        t.restart_resolver(with_lab_root)

