"""DNS on the gateway end to end: a client that applies the connect response resolves through the tunnel.

One topology for the whole module:

    client ns ──veth── server ns: helper, gunicorn, Unbound on 10.8.0.1 ──uplink── internet ns
    10.8.0.x (tunnel)   (ORBMESH_DNS_UPSTREAM=203.0.113.100, DNSSEC off)     203.0.113.100: a DNS server
    resolv.conf = dns                                                        answering 203.0.113.1 only

There is no NAT (no ORBMESH_NAT_UPLINK): the client reaches the internet
namespace only through the gateway's resolver, and the DNS server there
answers only the server's uplink address, so an answer the client gets
came through the tunnel from the gateway's resolver.  The internet
namespace routes the pool to the server, so it can also try the gateway's
resolver as an outsider.
"""
import re
import shutil
from pathlib import Path

import pytest

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import INTERNET_ADDR, SERVER_UPLINK_ADDR, DnsServer, Internet
from .netns import creator, veth
from .stack import CLIENT_ADDR, GATEWAY, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient

pytestmark = pytest.mark.e2e

NAME = "www.example.org"   # served by the internet's DNS server only (not a special-use name Unbound answers itself)
ADDRESS = "198.51.100.80"


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)

        self.made = made
        self.server, self.client = netns("dnssrv"), netns("dnscli")
        veth(self.server, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        self.internet = Internet(netns, self.server)
        self.internet.ns.run("ip", "route", "add", "10.8.0.0/16", "via", SERVER_UPLINK_ADDR)
        self.upstream = DnsServer(self.internet.ns, INTERNET_ADDR, {NAME: ADDRESS}, [SERVER_UPLINK_ADDR], tmp)
        self.stack = Stack(self.server, self.client, tmp, workers=1)
        self.stack.env.update({"ORBMESH_DNS_RESOLVER": "on", "ORBMESH_DNS_UPSTREAM": INTERNET_ADDR,
                               "ORBMESH_DNS_DNSSEC": "off"})
        self.wg = None
        self.reply = None
        self.etc = Path("/etc/netns") / self.client.name

    def connect_client(self):
        """Connect, then apply the answer as a stock client would: WireGuard from its fields, resolv.conf from `dns`."""
        self.wg = WgClient(self.client, "omdns" + self.client.name[-6:])
        status, self.reply = self.stack.connect("dns-user", "dns-device", self.wg.public_key)
        assert status == 200, self.reply
        r = self.reply
        self.wg.configure(server_public_key=r["serverPublicKey"], endpoint=r["serverEndpoint"],
                          address_cidr=r["ip"], address6_cidr=r["ip6"], allowed_ips=r["allowedIPs"], mtu=r["mtu"],
                          keepalive=r["keepalive"])
        # `ip netns exec` mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
        self.etc.mkdir(parents=True)
        (self.etc / "resolv.conf").write_text("".join("nameserver %s\n" % server for server in r["dns"]))
        assert wait_for(lambda: self.wg.ping(GATEWAY, count=1, timeout=2), timeout=30, what="the tunnel")

    def lookup(self):
        """The client's own resolver, as configured (resolv.conf): dig's output."""
        return self.client.run("dig", "+tries=1", "+time=2", NAME, check=False, timeout=30).stdout

    def close(self):
        if self.wg is not None:
            self.wg.close()
        shutil.rmtree(self.etc, ignore_errors=True)
        try:
            self.etc.parent.rmdir()  # /etc/netns, when nothing else (say, another test) uses it
        except OSError:
            pass
        self.upstream.close()
        self.internet.close()


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    requirements("unbound", "dig", "getent", "ss")
    made = []
    sockets_before = _wireguard_sockets()
    t = None
    try:
        t = Topology(made, tmp_path_factory.mktemp("dns"))
        wait_for(t.upstream.ready, what="the internet's DNS server")
        # The resolver before the app, so that the app's first probe finds it.
        t.stack.start_helper()
        t.stack.start_resolver()
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


def answer(dig_output):
    """(status, A records, server) from dig's output."""
    status = re.search(r"status: (\w+)", dig_output)
    server = re.search(r"^;; SERVER: ([^#]+)#53", dig_output, re.M)
    records = re.findall(r"^\S+\.\s+\d+\s+IN\s+A\s+(\S+)$", dig_output, re.M)
    return (status.group(1) if status else None), records, (server.group(1) if server else None)


def test_a_client_resolves_through_the_gateway_resolver(topo):
    t = topo
    # The gateways first, IPv4 then IPv6: a resolver is there.
    assert t.reply["dns"] == [GATEWAY, t.reply["gateway6"], "1.1.1.1"] and t.reply["gateway6"]
    # A stock libc lookup, resolv.conf in the order of `dns`.
    hosts = t.client.run("getent", "hosts", NAME, check=False, timeout=60)
    assert hosts.returncode == 0 and hosts.stdout.split() == [ADDRESS, NAME], hosts
    # It was the first resolver, the gateway, that answered: no wait for a timeout and a fallback.
    assert answer(t.lookup()) == ("NOERROR", [ADDRESS], GATEWAY)
    # The internet's server was asked by the server's uplink only ...
    assert set(t.upstream.askers(NAME)) == {SERVER_UPLINK_ADDR}
    # ... and the client cannot ask it itself (no NAT): the answer came through the gateway's resolver.
    direct = t.client.run("dig", "+tries=1", "+time=1", "@" + INTERNET_ADDR, NAME, check=False, timeout=30)
    assert answer(direct.stdout)[0] is None and "timed out" in direct.stdout


def test_the_gateway_resolver_answers_the_pool_only(topo):
    t, dig = topo, Stack.dig
    # Outsiders get REFUSED: from the internet, and from the server's own non-pool addresses.
    assert answer(dig(t.internet.ns, GATEWAY, NAME))[0] == "REFUSED"
    for source in (SERVER_ADDR, "127.0.0.1"):  # Unbound would allow localhost by default
        assert answer(dig(t.server, GATEWAY, NAME, source=source))[0] == "REFUSED", source
    # Controls: pool addresses get answers, the client's through the tunnel and the gateway's own.
    assert answer(dig(t.client, GATEWAY, NAME)) == ("NOERROR", [ADDRESS], GATEWAY)
    assert answer(dig(t.client, t.reply["gateway6"], NAME))[1] == [ADDRESS]  # the IPv6 gateway, through the tunnel
    assert answer(dig(t.server, GATEWAY, NAME, source=GATEWAY))[1] == [ADDRESS]
    # It listens on the gateway addresses and nowhere else (UDP and TCP).
    for proto in ("-u", "-t"):
        listening = t.server.run("ss", "-H", "-ln", proto, "sport = :53").stdout.split("\n")
        assert {line.split()[3] for line in listening if line.strip()} == {
            GATEWAY + ":53", "[%s]:53" % t.reply["gateway6"]}, listening


def health(stack):
    status, body = stack.call("GET", "/health", api_key=stack.api_key)  # the details need the key
    return status, body


def test_health_follows_the_resolver(topo):
    stack = topo.stack
    status, body = health(stack)
    assert (status, body["status"], body["resolver"]) == (
        200, "healthy", {"enabled": True, "address": GATEWAY, "ok": True})
    stack.stop_resolver()
    try:
        wait_for(lambda: health(stack)[1]["status"] == "degraded", timeout=30, what="degraded without the resolver")
        body = health(stack)[1]
        assert body["resolver"]["ok"] is False and body["wireguard"]["running"] is True
        _, _, raw = stack.request("GET", "/metrics", headers={"X-API-Key": stack.api_key})
        failures = re.search(r"^orbmesh_dns_probe_failures_total (\S+)$", raw.decode(), re.M)
        assert failures and float(failures.group(1)) >= 1
    finally:
        stack.start_resolver()
    wait_for(lambda: health(stack)[1]["status"] == "healthy", timeout=30, what="healthy with the resolver back")


def test_the_resolver_outlives_a_helper_restart(topo):
    """A helper restart that has to make the interface anew (it was lost meanwhile, taking the gateway
    address along): Unbound, untouched, answers on the new interface's address (ip-freebind)."""
    t, dig = topo, Stack.dig
    pid = t.stack.resolver_proc.pid
    t.stack.stop_helper()
    assert answer(dig(t.server, GATEWAY, NAME, source=GATEWAY))[1] == [ADDRESS]  # a stopped helper keeps it all
    t.server.run("ip", "link", "del", "dev", t.stack.interface)
    assert t.server.run("ip", "address", "show", "to", GATEWAY).stdout.strip() == ""  # the address is gone
    t.stack.start_helper()
    wait_for(lambda: answer(dig(t.server, GATEWAY, NAME, source=GATEWAY))[1] == [ADDRESS], timeout=30,
             what="an answer on the new interface's gateway address")
    assert t.stack.resolver_proc.pid == pid and t.stack.resolver_proc.poll() is None
