"""No IPv6 black hole: the helper's ipv6 mode (wghelper/ipv6.py) seen by a real client.

One topology for the module (the dual-stack internet of tests/e2e/internet.py):

    client 192.0.2.2 ── 192.0.2.1 SERVER 203.0.113.1, 2001:db8:113::1 ── INTERNET 203.0.113.100, 2001:db8:114::100
                                                                         (whoami :8000 on both)

The server has NAT on its uplink and the default IPv6 pool (unique-local,
NAT66).  What changes between the tests is the one switch the operator
owns, net.ipv6.conf.all.forwarding in the server namespace, read by the
helper when it starts:

* 1 ("forward"): a client's IPv6 reaches the internet; without an IPv6
  default route the node refuses it at once (ICMPv6), so a connect fails
  in milliseconds instead of hanging.
* 0 ("local"): the node would drop a client's IPv6 without a word, so
  clients get no IPv6 address at all and their peers no /128; peers that
  had one lose it when the helper restarts, and get it back with
  forwarding.

Each test prints what it measured (run with -s to see it).
"""
import errno
import ipaddress
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import (INTERNET_ADDR, INTERNET_ADDR6, SERVER_UPLINK_ADDR, SERVER_UPLINK_ADDR6, UPLINK_ROUTER6,
                       WHOAMI_PORT, Internet)
from .netns import creator, unique_ifname, veth
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient, keypair

pytestmark = pytest.mark.e2e

NAME = "dual.test"  # in the client namespace's hosts file with both of the internet host's addresses
# An app connecting to a name, as socket.create_connection does: every address in getaddrinfo's order.
APP = """
import json, socket, sys, time
start = time.monotonic()
order = [info[4][0] for info in socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), 0, socket.SOCK_STREAM)]
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as sock:
    peer = sock.getpeername()[0]
    sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    seen = b"".join(iter(lambda: sock.recv(4096), b"")).split(b"\\r\\n\\r\\n", 1)[1].decode()
print(json.dumps({"order": order, "peer": peer, "seen": seen, "seconds": time.monotonic() - start}))
"""


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)
        self.server, self.client = netns("srv6m"), netns("cli6m")
        veth(self.server, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        self.internet = Internet(netns, self.server, ipv6=True)
        self.stack = Stack(self.server, self.client, tmp, workers=1)  # one watcher: see restart()
        self.stack.env["ORBMESH_NAT_UPLINK"] = self.internet.uplink
        # `ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts.
        self.etc = Path("/etc/netns") / self.client.name
        self.etc.mkdir(parents=True)
        (self.etc / "hosts").write_text("%s %s\n%s %s\n" % (INTERNET_ADDR, NAME, INTERNET_ADDR6, NAME))

    def close(self):
        shutil.rmtree(self.etc, ignore_errors=True)
        try:
            self.etc.parent.rmdir()  # /etc/netns, when nothing else uses it
        except OSError:
            pass
        self.internet.close()

    def mode(self):
        status, health = self.stack.call("GET", "/health", api_key=self.stack.api_key)
        return health["wireguard"]["ipv6"] if status == 200 else None

    def restart(self, forwarding):
        """The operator sets the switch and restarts the helper; the app stays up and learns the mode
        from the new generation (its one watcher tells the request path, app/peers/reconcile.py)."""
        self.stack.ipv6_forwarding = forwarding
        self.stack.stop_helper()
        self.stack.start_helper()
        wait_for(lambda: self.mode() == ("forward" if forwarding else "local"), what="the helper's ipv6 mode")

    def client_for(self, device):
        """A client that applies the connect answer as it is (wg-quick: both addresses when given, every
        allowed IP routed into the tunnel), its tunnel proven over IPv4."""
        client = WgClient(self.client, unique_ifname("om6m"))
        status, body = self.stack.connect("mode-user", device, client.public_key)
        assert status == 200, body
        assert body["allowedIPs"] == ["0.0.0.0/0", "::/0"]  # in every mode: no IPv6 goes around the tunnel
        client.configure(server_public_key=body["serverPublicKey"], endpoint=body["serverEndpoint"],
                         address_cidr=body["ip"], address6_cidr=body["ip6"], allowed_ips=body["allowedIPs"],
                         mtu=body["mtu"], keepalive=body["keepalive"])
        assert wait_for(lambda: self.internet.whoami_from(self.client, timeout=2) == SERVER_UPLINK_ADDR,
                        timeout=30, interval=0.3, what="IPv4 through the tunnel")
        return client, body

    def whoami6(self, timeout=3):
        return self.internet.whoami_from(self.client, timeout=timeout, url=self.internet.url6)

    def ip6_of(self, ip):
        pool = ipaddress.ip_network("10.8.0.0/16")
        return "%s/128" % (self.stack.pool6().network_address + int(ipaddress.ip_address(ip.split("/")[0]))
                           - int(pool.network_address))


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    requirements("nft", "sysctl")
    made = []
    sockets_before = _wireguard_sockets()
    t = None
    try:
        t = Topology(made, tmp_path_factory.mktemp("ipv6mode"))
        with t.stack.running():
            yield t
    finally:
        if t is not None:
            t.close()
        inodes = {ns.inode for ns in made}
        for ns in reversed(made):
            ns.delete()
        _remove_dead_sockets(_wireguard_sockets() - sockets_before)
        assert not wireguard_go_in(inodes), "wireguard-go left running"


def tcp6(ns, address, port=WHOAMI_PORT, timeout=3.0):
    """(seconds, errno or None) of one TCP connect over IPv6 from inside `ns`: None when it connected."""
    sock = ns.socket_in(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    start = time.monotonic()
    try:
        sock.connect((address, port))
        return time.monotonic() - start, None
    except socket.timeout:
        return time.monotonic() - start, "timeout"
    except OSError as exc:
        return time.monotonic() - start, errno.errorcode.get(exc.errno, exc.errno)
    finally:
        sock.close()


def unreachables6(ns):
    """ICMPv6 destination-unreachable messages the namespace has received."""
    counters = dict(line.split() for line in ns.run("cat", "/proc/net/snmp6").stdout.splitlines())
    return int(counters["Icmp6InDestUnreachs"])


def source6(ns, address):
    """The source address the client's kernel picks for `address` (a UDP connect sends nothing)."""
    sock = ns.socket_in(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.connect((address, 9))
        return sock.getsockname()[0]
    finally:
        sock.close()


def test_with_forwarding_clients_reach_the_ipv6_internet_or_are_refused_at_once(topo):
    t = topo
    if t.mode() != "forward":
        t.restart(True)
    client, body = t.client_for("forward")
    try:
        assert body["ip6"] == t.ip6_of(body["ip"]) and body["gateway6"]
        assert t.stack.wg_peers()[client.public_key] == "%s %s" % (body["ip"], body["ip6"])
        # IPv6 to the internet works, NAT66 to the uplink's address; IPv4 beside it.
        seen6 = wait_for(t.whoami6, timeout=30, interval=0.3, what="whoami over IPv6")
        assert seen6 == SERVER_UPLINK_ADDR6
        assert t.internet.whoami_from(t.client, timeout=3) == SERVER_UPLINK_ADDR

        # No IPv6 default route on the node: the kernel answers the client's SYN with ICMPv6 "no
        # route" at once; the connect fails in milliseconds, no black hole.
        t.server.run("ip", "-6", "route", "del", "default")
        try:
            icmp = unreachables6(t.client)
            seconds, error = tcp6(t.client, INTERNET_ADDR6)
            print("\nforward, no IPv6 default route: IPv6 connect failed with %s in %.4f s" % (error, seconds))
            assert error in ("ENETUNREACH", "EHOSTUNREACH"), error
            assert unreachables6(t.client) > icmp  # the node's answer, through the tunnel
            assert seconds < 1.0, seconds  # the bound a client sees (docs/operations.md)
            # Controls in the same state: IPv4 goes on, and the gateway still answers over IPv6.
            assert t.internet.whoami_from(t.client, timeout=3) == SERVER_UPLINK_ADDR
            assert client.ping(body["gateway6"], count=1, timeout=3)
        finally:
            t.server.run("ip", "-6", "route", "replace", "default", "via", UPLINK_ROUTER6)
        seconds, error = tcp6(t.client, INTERNET_ADDR6)
        assert error is None, error  # control: with the route back, the same connect opens
        print("forward: IPv6 connect to the internet host opened in %.4f s" % seconds)
    finally:
        client.close()


def test_without_forwarding_clients_get_no_ipv6_and_use_ipv4(topo):
    t = topo
    if t.mode() != "forward":
        t.restart(True)
    before = keypair()[1]  # a device connected while IPv6 was forwarded: its peer holds its /128
    status, first = t.stack.connect("mode-user", "before", before)
    assert status == 200 and first["ip6"], first
    client = None
    try:
        assert t.stack.wg_peers()[before] == "%s %s" % (first["ip"], first["ip6"])

        t.restart(False)
        # Reconcile converges the peers of the old mode: the /128 is gone from the interface.
        wait_for(lambda: t.stack.wg_peers().get(before) == first["ip"], timeout=30,
                 what="the /128 taken off the peer")
        assert t.stack.wg_peers() == t.stack.db_peers()
        status, health = t.stack.call("GET", "/health", api_key=t.stack.api_key)
        assert (health["wireguard"]["ipv6"], health["wireguard"]["gateway6"]) == ("local", None)
        status, live = t.stack.call("GET", "/wireguard/status", api_key=t.stack.api_key)
        assert status == 200 and live["gateway6"] is None

        client, body = t.client_for("without")
        assert (body["ip6"], body["gateway6"]) == (None, None)
        assert body["dns"] == ["1.1.1.1"]  # the stack runs no resolver; no IPv6 server is named either way
        assert t.stack.wg_peers()[client.public_key] == body["ip"]  # no /128
        # The client has no IPv6 address but its link-local ones: nothing from the pool.
        assert t.client.run("ip", "-6", "-o", "address", "show", "scope", "global").stdout.strip() == ""
        src = source6(t.client, INTERNET_ADDR6)
        assert ipaddress.ip_address(src).is_link_local, src

        # An app connecting to a name with both addresses: IPv4, at once.
        done = t.client.run(sys.executable, "-c", APP, NAME, str(WHOAMI_PORT), timeout=30)
        app = json.loads(done.stdout)
        print("\nlocal: getaddrinfo order %s; the app connected to %s in %.3f s (the internet saw %s)"
              % (app["order"], app["peer"], app["seconds"], app["seen"]))
        assert (app["peer"], app["seen"]) == (INTERNET_ADDR, SERVER_UPLINK_ADDR)
        assert app["seconds"] < 1.0, app  # the bound a client sees (docs/operations.md)

        # IPv6 by address: it leaves from a link-local source, which the node's WireGuard drops (not
        # the client's allowed IP): nothing reaches the internet.  Measured, not bounded: it waits for
        # the connect's own timeout (the limit of this mode, docs/operations.md).
        seconds, error = tcp6(t.client, INTERNET_ADDR6)
        print("local: IPv6 connect by address: %s after %.3f s" % (error or "connected", seconds))
        assert error is not None
        assert t.whoami6(timeout=2) is None
        assert t.internet.whoami_from(t.client, timeout=3) == SERVER_UPLINK_ADDR  # control: IPv4 works

        # Forwarding back on: the peers get their /128s again, and a client its IPv6.
        t.restart(True)
        wait_for(lambda: t.stack.wg_peers().get(before) == "%s %s" % (first["ip"], first["ip6"]),
                 timeout=30, what="the /128 back on the peer")
        status, again = t.stack.connect("mode-user", "without", client.public_key)
        assert status == 200 and (again["ip"], again["ip6"]) == (body["ip"], t.ip6_of(body["ip"]))
        t.client.run("ip", "address", "add", again["ip6"], "dev", client.ifname, "nodad")
        assert wait_for(t.whoami6, timeout=30, interval=0.3, what="whoami over IPv6") == SERVER_UPLINK_ADDR6
    finally:
        if client is not None:
            client.close()
