"""Usage, speed tiers and quotas end to end: real wireguard-go clients, the real helper and app, iperf3.

One topology for the whole module:

    client ns "cli" (user tier20, and the quota and usage users) ──┐
                                                                    ├── SERVER ── uplink ── INTERNET
    client ns "free" (user free: no tier) ── 198.51.100.0/30 ──────┘               203.0.113.100, 2001:db8:114::100
                                                                                    iperf3 servers, a TCP source

Each client applies its connect answer (both addresses, all of IPv4 and
IPv6 into the tunnel); the server masquerades them out of its uplink.  What
a client sees is measured: iperf3's own bit rates and byte counts, pings.
"""
import json
import re
import socket
import statistics
import subprocess
import threading
import time

import pytest

from wghelper import limits as limits_part

from .conftest import _remove_dead_sockets, _wireguard_sockets, requirements, wireguard_go_in
from .internet import INTERNET_ADDR, INTERNET_ADDR6, Internet
from .netns import creator, stop_process, unique_ifname, veth
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient

pytestmark = pytest.mark.e2e

TIER = 20            # Mbit/s
BAND = (18.0, 21.0)  # what iperf3 must measure for it, each way (the bound)
RUNS = 3             # of each tier measurement: no run over the band, the median in it
UNTIERED = "150M"    # what the untiered user's iperf3 sends beside it: far over the tier, short of the CPU
QUOTA = 50_000_000
CUT_BOUND = 52_000_000
SECONDS = 8          # each iperf3 run
OMIT = 2             # seconds iperf3 leaves out first


class Topology:
    def __init__(self, made, tmp):
        netns = creator(made)
        self.server, self.client = netns("srvu"), netns("cliu")
        veth(self.server, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        self.free = self.machine(netns("freeu"), 0)    # the second user's machine
        self.meter = self.machine(netns("meteru"), 1)  # the machine whose usage is checked against iperf3
        self.internet = Internet(netns, self.server, ipv6=True)
        self.server.run("sysctl", "-w", "net.ipv6.conf.all.forwarding=1")
        self.stack = Stack(self.server, self.client, tmp)
        self.stack.env.update({"ORBMESH_NAT_UPLINK": self.internet.uplink, "ORBMESH_USAGE_INTERVAL": "0.5",
                               "ORBMESH_AUDIT_LOG": str(tmp / "audit.log")})
        self.iperf = {}
        self.clients = []

    def machine(self, ns, n):
        """`ns` with a link of its own to the server (198.51.100.4n/30) and a route to the API address."""
        veth(self.server, "198.51.100.%d/30" % (4 * n + 1), ns, "198.51.100.%d/30" % (4 * n + 2))
        ns.run("ip", "route", "add", SERVER_ADDR + "/32", "via", "198.51.100.%d" % (4 * n + 1))
        return ns

    def iperf_server(self, address, port):
        """An iperf3 server in the internet namespace (one per client run at a time)."""
        proc = self.internet.ns.popen(["iperf3", "-s", "-B", address, "-p", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.iperf[(address, port)] = proc
        wait_for(lambda: _listening(self.internet.ns, port), what="iperf3 -s on %s:%d" % (address, port))

    def client_of(self, ns, user, device, key_pair=None):
        """A WireGuard client in `ns` that applies the connect answer of (user, device)."""
        client = WgClient(ns, unique_ifname("omu"))
        self.clients.append(client)
        status, body = self.stack.connect(user, device, client.public_key)
        assert status == 200, body
        client.configure(server_public_key=body["serverPublicKey"], endpoint=body["serverEndpoint"],
                         address_cidr=body["ip"], address6_cidr=body["ip6"], allowed_ips=body["allowedIPs"],
                         mtu=body["mtu"], keepalive=body["keepalive"])
        assert wait_for(lambda: client.ping(INTERNET_ADDR, timeout=1), timeout=20, what="ping through the tunnel")
        client.body = body
        return client

    def reconnect(self, client, user, device, between=None):
        """The device disconnects (then between() runs), then connects again with its key (its address may
        change): the client applies the new answer as an app would (its address, and its peer afresh for
        a new handshake)."""
        status, body = self.stack.call("POST", "/wireguard/disconnect", {}, token=self.stack.token(user, device))
        assert status == 200, body
        if between is not None:
            between()
        status, body = self.stack.connect(user, device, client.public_key)
        assert status == 200, body
        ns, ifname = client.ns, client.ifname
        ns.run("ip", "address", "flush", "dev", ifname)
        ns.run("ip", "address", "add", body["ip"], "dev", ifname)
        ns.run("ip", "address", "add", body["ip6"], "dev", ifname, "nodad")
        ns.run("wg", "set", ifname, "peer", body["serverPublicKey"], "remove")
        ns.run("wg", "set", ifname, "peer", body["serverPublicKey"], "endpoint", body["serverEndpoint"],
               "allowed-ips", ",".join(body["allowedIPs"]), "persistent-keepalive", str(body["keepalive"]))
        for network in body["allowedIPs"]:
            ns.run("ip", "route", "replace", network, "dev", ifname)
        client.body = body

    def close(self):
        for client in self.clients:
            client.close()
        for proc in self.iperf.values():
            stop_process(proc)
        self.internet.close()


def _listening(ns, port):
    return ":%d " % port in ns.run("ss", "-ltn", check=False).stdout


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    requirements("nft", "sysctl", "iperf3", "ss")
    made = []
    sockets_before = _wireguard_sockets()
    t = None
    try:
        t = Topology(made, tmp_path_factory.mktemp("usage"))
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


def iperf(ns, target, port, seconds=SECONDS, reverse=False, omit=OMIT, extra=()):
    """iperf3's JSON end block: client to server (reverse: server to client, the download), the first
    `omit` seconds (TCP's slow start, and the one second a tier's bucket holds) not counted."""
    argv = ["iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-O", str(omit), "-J",
            "--connect-timeout", "5000", *(["-R"] if reverse else []), *extra]
    done = ns.run(*argv, check=False, timeout=seconds + 60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert "error" not in result, result["error"]
    return result["end"]


def mbps(end):
    return end["sum_received"]["bits_per_second"] / 1e6


def parallel(*calls):
    """Run the calls at once; their results in order."""
    results = [None] * len(calls)

    def one(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def limits(t, user, **body):
    status, answer = t.stack.call("POST", "/wireguard/limits", dict({"userUuid": user}, **body),
                                  api_key=t.stack.api_key)
    assert status == 200, answer
    return answer


def usage_of(t, user):
    status, answer = t.stack.call("GET", "/wireguard/usage?userUuid=" + user, api_key=t.stack.api_key)
    assert status == 200, answer
    return answer


def test_a_20_mbit_tier_each_way_while_an_untiered_user_runs_at_full_rate(topo):
    """Every run stays under the band's top (the tier is enforced), the median of each direction's runs
    reaches its bottom (the user gets the tier); the untiered user beside it gets all of its 150 Mbit/s.
    The tier is a policer, and over the lab's sub-millisecond round trip an upload lives on its drops and
    the retransmission timer: beside an untiered upload that took both of CI's CPUs, one run measured
    8.4 Mbit/s, and 4 of 13 runs on 2026-12-07 fell under 18 (docs/operations.md, speed tiers)."""
    t = topo
    limits(t, "tier20", rateMbps=TIER)
    t.client_of(t.client, "tier20", "laptop")
    t.client_of(t.free, "free", "laptop")
    for port in (5201, 5202):
        t.iperf_server(INTERNET_ADDR, port)
    t.iperf_server(INTERNET_ADDR6, 5203)
    marks = MarkProbe(t.server, t.stack.interface)
    try:
        measured = {}
        for name, reverse in (("up", False), ("down", True)):
            runs = [parallel(lambda: iperf(t.client, INTERNET_ADDR, 5201, reverse=reverse),
                             lambda: iperf(t.free, INTERNET_ADDR, 5202, reverse=reverse, extra=("-b", UNTIERED)))
                    for _ in range(RUNS)]
            measured[name] = ([mbps(ours) for ours, _ in runs], [mbps(theirs) for _, theirs in runs])
        for name, reverse in (("up6", False), ("down6", True)):
            measured[name] = ([mbps(iperf(t.client, INTERNET_ADDR6, 5203, reverse=reverse)) for _ in range(RUNS)],
                              None)
        alone = mbps(iperf(t.free, INTERNET_ADDR, 5202, reverse=True))
        with_burst = mbps(iperf(t.client, INTERNET_ADDR, 5201, seconds=10, omit=0))
        counted = marks.counts()
    finally:
        marks.close()
    print("TIER %s, untiered alone %.1f Mbit/s, tiered 10 s from the first byte %.1f Mbit/s, marks %s" % (
        {name: [[round(x, 2) for x in runs] for runs in pair if runs] for name, pair in measured.items()},
        alone, with_burst, counted))
    for name, (ours, theirs) in measured.items():
        assert max(ours) <= BAND[1] and statistics.median(ours) >= BAND[0], (name, ours)
        if theirs is not None:  # the control: the same path without a tier, in the same runs
            assert min(theirs) > 3 * BAND[1], (name, theirs)
    # The tier rides in the packet's mark only inside the helper's chains: every packet leaves them with
    # none (counted after them, both ways; the control: the same hooks saw the tiered traffic).
    assert counted["marked_in"] == 0 and counted["marked_out"] == 0, counted
    assert counted["seen_in"] > 1000 and counted["seen_out"] > 1000, counted


def test_no_packet_leaves_the_tier_chains_marked_while_the_table_is_rewritten(netns):
    """A whole rewrite under a flood: packets walking the old rules meet the new generation's elements.
    The tier rules alone (the helper's renderer) on a router between two namespaces; 0-3 packets of a
    million left marked with the dispatch in the hooked chain (the layout before, docs/benchmarks.md)."""
    client, router, server = netns("mkc"), netns("mkr"), netns("mks")
    _, towards_client = veth(client, "10.8.200.2/24", router, "10.8.200.1/24")
    veth(router, "198.51.100.1/24", server, "198.51.100.2/24")
    client.run("ip", "route", "add", "default", "via", "10.8.200.1")
    server.run("ip", "route", "add", "10.8.200.0/24", "via", "198.51.100.1")
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    tiered = {"10.8.0.%d" % i: (10, 20, 50)[i % 3] for i in range(10, 210)}
    tiered["10.8.200.2"] = 1000  # the flooding client: over no rate
    v = limits_part.View(tiered, {}, {})
    whole = "table inet orbmesh {}\ndelete table inet orbmesh\ntable inet orbmesh {\n%s}\n" % "\n".join(
        limits_part.objects(v) + limits_part.chains(v, towards_client))
    router.run("nft", "-f", "-", input=whole)
    iperf = server.popen(["iperf3", "-s", "-B", "198.51.100.2"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    marks, done, rewrites = MarkProbe(router, towards_client), threading.Event(), []

    def rewrite():
        while not done.is_set():
            router.run("nft", "-f", "-", input=whole)
            rewrites.append(1)

    writer = threading.Thread(target=rewrite)
    try:
        wait_for(lambda: ":5201 " in server.run("ss", "-ltnH").stdout, what="iperf3 listening")
        writer.start()
        for reverse in ([], ["-R"]):
            client.run("iperf3", "-c", "198.51.100.2", "-u", "-b", "500M", "-l", "1200", "-t", "8", *reverse,
                       timeout=60)
    finally:
        done.set()
        if writer.is_alive():
            writer.join()
        stop_process(iperf)
    counted = marks.counts()
    print("REWRITES %d, marks %s" % (len(rewrites), counted))
    assert len(rewrites) > 50 and counted["seen_in"] > 100_000 and counted["seen_out"] > 100_000, counted
    assert counted["marked_in"] == 0 and counted["marked_out"] == 0, counted


class MarkProbe:
    """Counters in a table of the test's own, hooked after the helper's: packets from and into the
    WireGuard interface that still carry a mark, and all of them.  The kernel's own MLD reports leave
    every interface with a mark of its own (0xd4 on 6.18, with no table at all): counted apart."""

    def __init__(self, ns, ifname):
        self.ns = ns
        ns.run("nft", "-f", "-", input="""table inet markprobe {
  counter marked_in { packets 0 bytes 0 }
  counter seen_in { packets 0 bytes 0 }
  counter marked_out { packets 0 bytes 0 }
  counter seen_out { packets 0 bytes 0 }
  counter mld_out { packets 0 bytes 0 }
  chain pre {
    type filter hook prerouting priority 10;
    iifname "%(i)s" meta mark != 0 counter name marked_in
    iifname "%(i)s" counter name seen_in
  }
  chain post {
    type filter hook postrouting priority 10;
    oifname "%(i)s" icmpv6 type mld2-listener-report counter name mld_out accept
    oifname "%(i)s" meta mark != 0 counter name marked_out
    oifname "%(i)s" counter name seen_out
  }
}
""" % {"i": ifname})

    def counts(self):
        listing = json.loads(self.ns.run("nft", "-j", "list", "counters", "table", "inet", "markprobe").stdout)
        return {c["counter"]["name"]: c["counter"]["packets"] for c in listing["nftables"] if "counter" in c}

    def close(self):
        self.ns.run("nft", "delete", "table", "inet", "markprobe", check=False)


def rx_bytes(client):
    """Bytes the client's tunnel interface received (inner IP packets: what the client got)."""
    return int(client.ns.run("cat", "/sys/class/net/%s/statistics/rx_bytes" % client.ifname).stdout)


def rates(client, seconds, period=0.1):
    """[(monotonic time, received bytes)] sampled every `period` for `seconds`."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append((time.monotonic(), rx_bytes(client)))
        time.sleep(period)
    return samples


def window_mbps(samples, start, length=0.5):
    """Mbit/s received over [start, start + length] (nearest samples)."""
    inside = [s for s in samples if start <= s[0] <= start + length]
    if len(inside) < 2:
        return None
    (t0, b0), (t1, b1) = inside[0], inside[-1]
    return (b1 - b0) * 8 / (t1 - t0) / 1e6


def took_effect(samples, since, done):
    """Seconds from `since` to the start of the first half-second window whose rate satisfies done()."""
    for at, _ in samples:
        if at >= since:
            rate = window_mbps(samples, at)
            if rate is not None and done(rate):
                return at - since
    return None


def test_changing_the_tier_takes_effect_within_2_s_without_reconnecting(topo):
    t = topo
    tiered = next(c for c in t.clients if c.body and c.ns is t.client)
    peer = t.stack.wg_peers()[tiered.public_key]
    ended = []
    flow = threading.Thread(target=lambda: ended.append(iperf(t.client, INTERNET_ADDR, 5201, seconds=16,
                                                              reverse=True, omit=0)))
    flow.start()
    try:
        samples, changes = [], {}

        def sample():
            samples.extend(rates(tiered, 15))

        watcher = threading.Thread(target=sample)
        watcher.start()
        time.sleep(5)
        changes["up"] = time.monotonic()
        limits(t, "tier20", rateMbps=50)
        time.sleep(5)
        changes["down"] = time.monotonic()
        limits(t, "tier20", rateMbps=TIER)
        watcher.join()
    finally:
        flow.join()
    before = window_mbps(samples, changes["up"] - 2, 2)
    faster = took_effect(samples, changes["up"], lambda rate: rate > 1.5 * BAND[1])
    steady = window_mbps(samples, changes["up"] + 2.5, 2.5)
    slower = took_effect(samples, changes["down"], lambda rate: rate < 1.25 * BAND[1])
    after = window_mbps(samples, changes["down"] + 2.5, 2.5)
    print("TIER CHANGE: %.1f Mbit/s at 20, to 50 after %s s, %.1f Mbit/s at 50, back to 20 after %s s, %.1f"
          % (before, faster, steady, slower, after))
    assert before < 1.1 * BAND[1] and after < 1.1 * BAND[1]  # the tier before and after the change
    assert faster is not None and faster <= 2.0, faster
    assert slower is not None and slower <= 2.0, slower
    assert 0.85 * 50 <= steady <= 1.1 * 50, steady
    # No reconnect: the one download ran to its end on one TCP connection, and the peer is the same.
    assert ended and ended[0]["sum_received"]["bytes"] > 0
    assert t.stack.wg_peers()[tiered.public_key] == peer


class Source:
    """A TCP source in the internet namespace: every connection gets zeros as fast as it takes them."""

    def __init__(self, ns, address, port=9100):
        self.listener = ns.socket_in(socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(8)
        self.address, self.port = address, port
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn):
        block = bytes(1 << 16)
        conn.settimeout(10)
        try:
            while not self._stop.is_set():
                conn.sendall(block)
        except OSError:
            pass
        finally:
            conn.close()

    def download(self, ns, stall=3.0, limit=200_000_000):
        """Bytes received from inside `ns` until nothing came for `stall` seconds (or `limit`)."""
        sock = ns.socket_in(socket.AF_INET6 if ":" in self.address else socket.AF_INET)
        sock.settimeout(stall)
        got = 0
        try:
            sock.connect((self.address, self.port))
            while got < limit:
                data = sock.recv(1 << 16)
                if not data:
                    break
                got += len(data)
        except OSError:
            pass
        finally:
            sock.close()
        return got

    def close(self):
        self._stop.set()
        self.listener.close()


def reaches(client, address=INTERNET_ADDR):
    return client.ping(address, count=1, timeout=1)


def test_a_50_mb_quota_cuts_then_a_new_period_brings_the_user_back(topo):
    t = topo
    control = next(c for c in t.clients if c.ns is t.free)
    limits(t, "capped", quotaBytes=QUOTA)
    capped = t.client_of(t.client, "capped", "phone")
    source = Source(t.internet.ns, INTERNET_ADDR)
    try:
        received = source.download(t.client)
    finally:
        source.close()
    wait_for(lambda: usage_of(t, "capped")["state"] == "quota_exceeded", timeout=10, what="the cut")
    used = usage_of(t, "capped")
    print("QUOTA: %d bytes reached the client, usage %d (up %d, down %d), quota %d" % (
        received, used["total"]["bytes"], used["total"]["bytesUp"], used["total"]["bytesDown"], QUOTA))
    # What the client got (TCP payload) and what the node counted: at most 52 MB crossed.  The usage
    # counts each packet with WireGuard's header and every retransmission, so the client gets less.
    assert QUOTA // 2 <= received <= CUT_BOUND, received
    # Not cut earlier than 1% short of the quota.  The kernel's object lets through 25/26 of what is left
    # in IP bytes, and a full-size packet is 2.25% more in WireGuard's count (1,420 -> 1,452 bytes on
    # 2026-12-07, TUN bytes against the usage): aimed only when it was made, it cut at 98.3% of the quota
    # (49.2 MB once); aimed at every count past half the quota, at most 1.7% of the half left early.
    assert 0.99 * QUOTA <= used["total"]["bytes"] <= CUT_BOUND, used["total"]
    assert used["devices"][0]["state"] == "quota" and used["devices"][0]["connected"]
    # The peer is off the interface, its row kept; connect and the tunnels answer 403 with the numbers.
    assert capped.public_key not in t.stack.wg_peers() and capped.public_key in t.stack.db_peers()
    status, body = t.stack.connect("capped", "phone", capped.public_key)
    assert status == 403 and body["error"]["code"] == "QUOTA_EXCEEDED", body
    assert body["error"]["details"] == {"usageBytes": used["total"]["bytes"], "quotaBytes": QUOTA}
    status, _, raw = t.stack.request("GET", "/wireguard/ws", headers={
        "Authorization": "Bearer " + t.stack.token("capped", "phone"), "Upgrade": "websocket",
        "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
    assert status == 403 and json.loads(raw)["error"]["code"] == "QUOTA_EXCEEDED"
    assert not reaches(capped) and reaches(control)  # cut, while another user is not (the control)
    audit = [json.loads(line) for line in open(t.stack.env["ORBMESH_AUDIT_LOG"])]
    assert [e["user"] for e in audit if e["event"] == "quota"] == ["capped"]
    # A new period: back at once, without a new connect.
    started = time.monotonic()
    assert limits(t, "capped", resetUsage=True)["state"] == "active"
    wait_for(lambda: reaches(capped, INTERNET_ADDR), timeout=10, interval=0.05, what="back after the reset")
    back = time.monotonic() - started
    print("QUOTA: back %.2f s after resetUsage" % back)
    assert back <= 2.0, back
    assert reaches(capped, INTERNET_ADDR6)


class PacedSource:
    """A UDP source in the internet namespace: a datagram from a client starts a stream back to it of
    full-size packets (`size` bytes of IP each: no segmentation offload merges them) at `mbps`."""

    def __init__(self, ns, address, size, mbps, port=9200, limit=80_000_000):
        self.sock = ns.socket_in(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.address, self.port, self.size, self.mbps, self.limit = address, port, size, mbps, limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                _, peer = self.sock.recvfrom(64)
                break
            except OSError:
                continue
        else:
            return
        payload = bytes(self.size - 28)  # IPv4 and UDP headers
        burst, started, sent = 32, time.monotonic(), 0
        while not self._stop.is_set() and sent < self.limit:
            for _ in range(burst):
                try:
                    self.sock.sendto(payload, peer)
                except OSError:
                    pass  # a full queue: what the node never sees counts nowhere
                sent += self.size
            ahead = started + sent * 8 / (self.mbps * 1e6) - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def download(self, ns, stall=3.0):
        """Bytes of payload received inside `ns` until nothing came for `stall` seconds."""
        sock = ns.socket_in(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(stall)
        got = 0
        try:
            sock.sendto(b"go", (self.address, self.port))
            while True:
                got += len(sock.recv(1 << 16))
        except OSError:
            pass
        finally:
            sock.close()
        return got

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def tun_dropped(t):
    """Packets the server's WireGuard interface dropped on their way out (to wireguard-go)."""
    path = "/sys/class/net/%s/statistics/tx_dropped" % t.stack.interface
    return int(t.server.run("cat", path).stdout)


def test_a_quota_of_full_size_packets_is_not_cut_early(topo):
    """Each full-size packet is 2.25% more in WireGuard's count than in the kernel's quota object, which
    lets through 25/26 of what is left: aimed only when it was made, the object cut this user at 98.3% of
    the quota (at 50 Mbit/s); aimed at the usage of every count past half the quota, within 1% of it."""
    t = topo
    paced = t.client_of(t.client, "paced", "laptop")
    limits(t, "paced", quotaBytes=QUOTA)
    # A pace wireguard-go keeps up with on a busy machine: a packet the kernel counted and then dropped
    # before WireGuard (the TUN's queue full) would make the object cut early, whatever its aim.
    dropped = tun_dropped(t)
    source = PacedSource(t.internet.ns, INTERNET_ADDR, size=paced.body["mtu"], mbps=25)
    try:
        received = source.download(t.client)
    finally:
        source.close()
    wait_for(lambda: usage_of(t, "paced")["state"] == "quota_exceeded", timeout=10, what="the cut")
    used = usage_of(t, "paced")["total"]["bytes"]
    dropped = tun_dropped(t) - dropped
    print("QUOTA PACED: %d bytes of UDP payload reached the client, usage %d (%.2f%% of the quota), %d packets "
          "dropped at the TUN" % (received, used, 100.0 * used / QUOTA, dropped))
    assert 0.99 * QUOTA <= used <= CUT_BOUND, (used, dropped)
    assert received <= used


MSS_OVERHEAD = 52     # IPv4 (20) and TCP with timestamps (32) in each segment
WIREGUARD = 32        # WireGuard's header and tag in each packet (what its counters add to the IP packet)


def wireguard_bytes(payload, retransmits, mtu):
    """What WireGuard counts for a TCP download of `payload` bytes in full segments (the MTU: no padding)."""
    return (payload / (mtu - MSS_OVERHEAD) + retransmits) * (mtu + WIREGUARD)


def received(end_or_intervals):
    """(payload the client received, segments the server sent again) of an iperf3 download's JSON."""
    if "sum_received" in end_or_intervals:
        return end_or_intervals["sum_received"]["bytes"], end_or_intervals["sum_sent"].get("retransmits", 0)
    return sum(i["sum"]["bytes"] for i in end_or_intervals), 0


def retransmitted(ns, port):
    """Segments the TCP connections of the iperf3 server on `port` in `ns` sent again, so far."""
    out = ns.run("ss", "-tin", "sport", "= :%d" % port).stdout
    return sum(int(n) for n in re.findall(r"\bretrans:\d+/(\d+)", out))


def test_usage_is_exact_across_restarts_and_a_reconnect(topo):
    t = topo
    meter = t.client_of(t.meter, "meter", "pc")
    for port in (5204, 5205, 5206):  # one per download: the one cut short keeps its server busy a while
        t.iperf_server(INTERNET_ADDR, port)
    pace = ["-b", "100M", "-i", "0.2"]
    resent = []
    counted = usage_of(t, "meter")["total"]
    assert counted["bytes"] < 100_000  # the pings of the setup
    # 1. One download across a helper restart and an app restart.
    pids = (t.stack.helper_proc.pid, t.stack.app_proc.pid)
    restarted = []

    def restart():
        time.sleep(4)
        t.stack.stop_helper()
        t.stack.start_helper()
        time.sleep(4)
        t.stack.stop_app()
        t.stack.start_app()
        restarted.append(True)

    restarts = threading.Thread(target=restart)
    restarts.start()
    first = iperf(t.meter, INTERNET_ADDR, 5204, seconds=20, reverse=True, omit=0, extra=pace)
    restarts.join()
    assert restarted and pids != (t.stack.helper_proc.pid, t.stack.app_proc.pid)
    # 2. One cut short by the device disconnecting in the middle of it; then it connects again.
    cut_short = {}

    def download():
        done = t.meter.run("iperf3", "-c", INTERNET_ADDR, "-p", "5205", "-t", "20", "-R", "-J", "--rcv-timeout",
                           "3000", *pace, check=False, timeout=80)
        cut_short.update(json.loads(done.stdout))

    flow = threading.Thread(target=download)
    flow.start()
    time.sleep(5)
    t.reconnect(meter, "meter", "pc", between=lambda: resent.append(retransmitted(t.internet.ns, 5205)))
    flow.join()
    wait_for(lambda: reaches(meter), timeout=20, what="ping after the reconnect")
    # 3. One more after the reconnect.
    third = iperf(t.meter, INTERNET_ADDR, 5206, seconds=6, reverse=True, omit=0, extra=pace)
    # The download cut short has no end block: its retransmissions up to the disconnect are the sender's.
    runs = [received(first), (received(cut_short["intervals"])[0], resent[0]), received(third)]
    expected = sum(wireguard_bytes(p, r, meter.body["mtu"]) for p, r in runs)
    time.sleep(3)  # a few counts
    wait_for(lambda: usage_of(t, "meter")["total"]["bytesDown"] > 0.9 * expected, timeout=20, what="the last count")
    time.sleep(2)
    down = usage_of(t, "meter")["total"]["bytesDown"] - counted["bytesDown"]
    print("USAGE: iperf3 payload %s (retransmits %s), WireGuard's bytes for it %.0f, counted down %d: %.3f%%" % (
        [p for p, _ in runs], [r for _, r in runs], expected, down, 100 * (down - expected) / expected))
    assert runs[1][0] > 10_000_000 and "error" in cut_short  # the disconnect did cut that download short
    assert runs[2][0] > 10_000_000
    assert abs(down - expected) <= 0.01 * expected
