"""The middlebox lab: a client with two links, a router whose nftables rules
the test toggles, and the node.

    client ns                          middlebox ns (routes)                server ns
      link A 198.51.100.2, 2001:db8:a::2 ──┐                                  192.0.2.1, 2001:db8:c::1
      link B 203.0.113.2,  2001:db8:b::2 ──┴── nft: block udp | GET ── ──────  helper + gunicorn :8080,
                                                                               WireGuard :51820, probes :51822

The client leaves by link A (its default routes); link B has its addresses
but no default route until switch_links() takes link A down, as when a
laptop moves from Wi-Fi to a phone's hotspot.  The middlebox forwards and
filters (inet: both families at once):

- "udp": drops every UDP datagram (WireGuard and the probes; both ways);
- "get": drops every TCP connection to the API whose first bytes are
  "GET " (marked by conntrack, so an established WebSocket dies with its
  upgrade): only plain HTTP POSTs pass, as through a strict proxy.

Everything lives in the test's own namespaces; traffic stays inside them
(documentation ranges only).  WireGuard clients ping the gateway through
their own interface, each through its own relay.
"""
import hashlib
import json
import os
import socket
import subprocess
import threading
import time

from app.api.auth import mint_device_token

from .continuity import Pinger
from .netns import stop_process, unique_ifname
from .stack import API_PORT, VENV_BIN, Stack, wait_for
from .wgclient import WgClient

GATEWAY = "10.8.0.1"
SERVER4, SERVER6 = "192.0.2.1", "2001:db8:c::1"
MBOX_SERVER4, MBOX_SERVER6 = "192.0.2.254", "2001:db8:c::fe"
LINK_A = {"client4": "198.51.100.2", "mbox4": "198.51.100.1", "client6": "2001:db8:a::2", "mbox6": "2001:db8:a::1"}
LINK_B = {"client4": "203.0.113.2", "mbox4": "203.0.113.1", "client6": "2001:db8:b::2", "mbox6": "2001:db8:b::1"}
PROBE_PORT = 51822
ECHO_PORT = 7007
# The node's firewall lets a client reach only the node's own services on the gateway; the lab's
# iperf3 servers and transfer listener are opened the way an operator opens a service.
IPERF_PORTS = (5201, 5202, 5203)
TRANSFER_PORT = 5204
TABLE = "orbmesh_mbox"
BLOCKS = {
    "udp": ["meta l4proto udp drop"],
    "get": ["ct mark 0x1 drop"],
}


def _link(ns_a, ns_b):
    """A veth pair, ns_a to ns_b, both ends up (no addresses)."""
    if_a, if_b = unique_ifname("mba"), unique_ifname("mbb")
    subprocess.run(["ip", "-n", ns_a.name, "link", "add", if_a, "type", "veth", "peer", "name", if_b,
                    "netns", ns_b.name], check=True, capture_output=True)
    for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
        ns.run("ip", "link", "set", ifname, "up")
    return if_a, if_b


def _address(ns, ifname, address):
    ns.run("ip", "address", "add", address, "dev", ifname, *(("nodad",) if ":" in address else ()))


class Lab:
    def __init__(self, netns, tmp_path, env=None):
        self.tmp = tmp_path
        self.server, self.mbox, self.client = netns("msrv"), netns("mbox"), netns("mcli")
        for ns in (self.mbox,):
            ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.server_if, mbox_server_if = _link(self.server, self.mbox)
        _address(self.server, self.server_if, SERVER4 + "/24")
        _address(self.server, self.server_if, SERVER6 + "/64")
        _address(self.mbox, mbox_server_if, MBOX_SERVER4 + "/24")
        _address(self.mbox, mbox_server_if, MBOX_SERVER6 + "/64")
        self.server.run("ip", "route", "add", "default", "via", MBOX_SERVER4)
        self.server.run("ip", "-6", "route", "add", "default", "via", MBOX_SERVER6)
        self.links = {}
        for name, plan in (("a", LINK_A), ("b", LINK_B)):
            client_if, mbox_if = _link(self.client, self.mbox)
            _address(self.client, client_if, plan["client4"] + "/24")
            _address(self.client, client_if, plan["client6"] + "/64")
            _address(self.mbox, mbox_if, plan["mbox4"] + "/24")
            _address(self.mbox, mbox_if, plan["mbox6"] + "/64")
            self.links[name] = client_if
        self.client.run("ip", "route", "add", "default", "via", LINK_A["mbox4"])
        self.client.run("ip", "-6", "route", "add", "default", "via", LINK_A["mbox6"])
        self.mbox.run("nft", "-f", "-", input=(
            "table inet %s {\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            # The first bytes of a connection to the API: "GET " marks it for the "get" block.
            "    tcp dport %d @ih,0,32 0x47455420 ct mark set 0x1\n"
            "    jump blocks\n"
            "  }\n"
            "  chain blocks {\n  }\n"
            "}\n") % (TABLE, API_PORT))
        self.blocked = set()
        self.stack = Stack(self.server, self.client, tmp_path, workers=1, server_addr=SERVER4)
        self.stack.extra_binds = ["[%s]:%d" % (SERVER6, API_PORT)]
        self.stack.env.update({"ORBMESH_LOG_LEVEL": "WARNING", "ORBMESH_PROBE_PORT": str(PROBE_PORT),
                               "ORBMESH_CLIENT_NODE_PORTS": ",".join(map(str, IPERF_PORTS + (TRANSFER_PORT,)))})
        self.stack.env.update(env or {})
        self.clients, self.relays, self.pingers = [], [], []

    # --- the middlebox ------------------------------------------------------------------------

    def block(self, *names):
        """Exactly these blocks from now on (none: everything passes)."""
        rules = [rule for name in names for rule in BLOCKS[name]]
        script = "flush chain inet %s blocks\n" % TABLE + "".join(
            "add rule inet %s blocks %s\n" % (TABLE, rule) for rule in rules)
        self.mbox.run("nft", "-f", "-", input=script)
        self.blocked = set(names)

    def switch_links(self):
        """Link A and its addresses go away; traffic leaves by link B from now on."""
        link = self.links["a"]
        self.client.run("ip", "link", "set", link, "down")
        self.client.run("ip", "address", "flush", "dev", link)
        self.client.run("ip", "route", "replace", "default", "via", LINK_B["mbox4"])
        self.client.run("ip", "-6", "route", "replace", "default", "via", LINK_B["mbox6"])

    # --- what passes the middlebox: the controls of every block ------------------------------

    def start_echo(self):
        """A UDP and TCP echo on both server addresses (ECHO_PORT), for udp_passes() and tcp_hangs()."""
        self.echo_socks = []
        for family, address in ((socket.AF_INET, SERVER4), (socket.AF_INET6, SERVER6)):
            udp = self.server.socket_in(family, socket.SOCK_DGRAM)
            udp.bind((address, ECHO_PORT))
            tcp = self.server.socket_in(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((address, ECHO_PORT))
            tcp.listen(16)
            self.echo_socks += [udp, tcp]
            threading.Thread(target=_udp_echo, args=(udp,), daemon=True).start()
            threading.Thread(target=_tcp_echo, args=(tcp,), daemon=True).start()

    def udp_passes(self, family=4, timeout=1.0):
        """Whether a UDP datagram to the server gets its echo back."""
        sock = self.client.socket_in(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        try:
            sock.sendto(b"ping", (SERVER4 if family == 4 else SERVER6, ECHO_PORT))
            return sock.recv(64) == b"ping"
        except OSError:
            return False
        finally:
            sock.close()

    def api(self, method, family=4, timeout=2.0):
        """The status of one request to the API (GET /health or POST /wireguard/probe without a token);
        None when no answer came within the timeout."""
        path = "/health" if method == "GET" else "/wireguard/probe"
        try:
            status, _, _ = self.client.http(method, self.url(family) + path, body=b"" if method == "POST" else None,
                                            timeout=timeout)
            return status
        except OSError:
            return None

    def tcp_connection(self, family=4):
        """A TCP connection to the server's echo, opened now (it keeps its local address)."""
        sock = self.client.socket_in(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
        sock.settimeout(3)
        sock.connect((SERVER4 if family == 4 else SERVER6, ECHO_PORT))
        return sock

    # --- clients ------------------------------------------------------------------------------

    def start(self):
        self.stack.start_helper()
        self.stack.start_app()
        return self

    def url(self, family=4):
        return "http://%s:%d" % (SERVER4 if family == 4 else "[%s]" % SERVER6, API_PORT)

    def endpoint(self, family=4):
        return "%s:51820" % SERVER4 if family == 4 else "[%s]:51820" % SERVER6

    def client_through_relay(self, transport, device, family=4, env=None, extra=()):
        """A WireGuard client whose endpoint is a local relay; returns a Client (not yet pinging)."""
        client = Client(self, transport, device, family, env, extra)
        self.clients.append(client)
        return client

    def handshake_on_node(self, public_key):
        """The node's latest handshake with this peer (unix time; 0: none)."""
        out = self.server.run("wg", "show", self.stack.interface, "latest-handshakes").stdout
        for line in out.splitlines():
            key, _, stamp = line.partition("\t")
            if key == public_key:
                return int(stamp)
        return 0

    def close(self):
        for client in self.clients:
            client.close()
        for sock in getattr(self, "echo_socks", ()):
            sock.close()
        self.stack.close()


def _udp_echo(sock):
    while True:
        try:
            data, source = sock.recvfrom(2048)
            sock.sendto(data, source)
        except OSError:
            return


def _tcp_echo(listener):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_tcp_echo_one, args=(conn,), daemon=True).start()


def _tcp_echo_one(conn):
    with conn:
        while True:
            try:
                data = conn.recv(2048)
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)


class Client:
    """One WireGuard client, its relay (orbmesh-relay in the client namespace) and, once asked, a pinger."""

    def __init__(self, lab, transport, device, family, env, extra):
        self.lab = lab
        self.transport = transport
        self.wg = WgClient(lab.client, unique_ifname("omx"))
        status, body = lab.stack.connect("auto-user", device, self.wg.public_key)
        assert status == 200, body
        self.body = body
        self.port = 42000 + len(lab.clients)
        self.status_path = lab.tmp / ("relay-%s.json" % device)
        self.log_path = lab.tmp / ("relay-%s.log" % device)
        self.relay = None
        self.pinger = None
        self.token = mint_device_token(lab.stack.config, "auto-user", device, ttl=3600)
        self.argv = [str(VENV_BIN / "orbmesh-relay"), "--transport", transport, "--url", lab.url(family),
                     "--endpoint", lab.endpoint(family), "--listen", "127.0.0.1:%d" % self.port,
                     "--status-interval", "0", "--status-file", str(self.status_path), *extra]
        self.env = dict(os.environ, ORBMESH_RELAY_TOKEN=self.token, **(env or {}))

    def start_relay(self, running=True):
        """The relay, and once it listens the WireGuard client pointed at it, as an app would start them.

        Returns when the WireGuard client was up: the start the issue's bounds count from (the relay
        already listening).  `listening_at` keeps when the relay was ready, `wireguard_up_at` the start."""
        log = open(self.log_path, "ab")
        self.relay = self.lab.client.popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.relay.poll() is not None or "listening on udp" in self.log_tail(), timeout=30,
                 what="the relay to listen")
        assert not running or self.relay.poll() is None, self.log_tail()
        self.listening_at = time.time()
        body = self.body
        self.wg.configure(server_public_key=body["serverPublicKey"], endpoint="127.0.0.1:%d" % self.port,
                          address_cidr=body["ip"], allowed_ips=[GATEWAY + "/32"], mtu=body["mtu"],
                          keepalive=body["keepalive"], metric=len(self.lab.pingers))
        self.wireguard_up_at = time.time()
        return self.wireguard_up_at

    def start_pinging(self):
        self.pinger = Pinger(self.lab.client, self.wg.ifname)
        self.lab.pingers.append(self.pinger)
        return self.pinger

    def status(self):
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def on(self, transport, timeout=60):
        """Wait until the relay's status names `transport` as the one in use; returns the status."""
        return wait_for(lambda: self.status().get("transport") == transport and self.status(), timeout=timeout,
                        what="relay %s on %s (log: %s)" % (self.transport, transport, self.log_tail()))

    def log_tail(self):
        try:
            return self.log_path.read_text()[-1500:]
        except OSError:
            return ""

    def handshake(self):
        return self.lab.handshake_on_node(self.wg.public_key)

    def relay_and_direct_mbps(self, pairs, seconds=2, port=IPERF_PORTS[2]):
        """[(direct, relay) Mbit/s] of iperf3 uploads through this client's WireGuard interface, its
        endpoint switched between the node itself and the relay before each run.  One run on a shared
        machine varies by +-20 %, so they come in pairs, each pair in the other order than the last."""
        server = self.lab.server.popen(["iperf3", "-s", "-B", GATEWAY, "-p", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        key = self.body["serverPublicKey"]
        endpoints = {"direct": self.lab.endpoint(4), "relay": "127.0.0.1:%d" % self.port}

        def mbps(path):
            self.lab.client.run("wg", "set", self.wg.ifname, "peer", key, "endpoint", endpoints[path])
            wait_for(lambda: self.wg.ping(GATEWAY, 1, 1), what="ping via %s" % path)
            out = self.lab.client.run("iperf3", "-c", GATEWAY, "-p", str(port), "-t", str(seconds), "-J",
                                      timeout=60).stdout
            return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6

        try:
            wait_for(lambda: self.wg.ping(GATEWAY, 1, 1), what="ping before iperf3")
            measured = []
            for i in range(pairs):
                order = ("direct", "relay") if i % 2 == 0 else ("relay", "direct")
                got = {path: mbps(path) for path in order}
                measured.append((got["direct"], got["relay"]))
            return measured
        finally:
            stop_process(server)

    def transfer(self, direction, size=4 * 1024 * 1024):
        """`size` random bytes over TCP through this client's tunnel ("up": to the gateway, "down": from it);
        (sent digest, received digest).  The client's socket is bound to its WireGuard interface, so
        other clients' routes to the gateway do not matter."""
        payload = os.urandom(size)
        client_ip = self.body["ip"].split("/")[0]
        listen_ns, dial_ns = (self.lab.server, self.lab.client) if direction == "up" else (self.lab.client,
                                                                                           self.lab.server)
        listener = listen_ns.socket_in(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if direction == "down":
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.wg.ifname.encode())
        listener.bind((GATEWAY, TRANSFER_PORT) if direction == "up" else (client_ip, 0))
        listener.listen(1)
        listener.settimeout(60)
        received = hashlib.sha256()
        done = threading.Event()

        def serve():
            conn, _ = listener.accept()
            conn.settimeout(120)
            with conn:
                while True:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    received.update(chunk)
            done.set()

        threading.Thread(target=serve, daemon=True).start()
        dial = dial_ns.socket_in(socket.AF_INET, socket.SOCK_STREAM)
        if direction == "up":
            dial.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.wg.ifname.encode())
        dial.settimeout(120)
        dial.connect(listener.getsockname())
        dial.sendall(payload)
        dial.close()
        assert done.wait(180), "transfer did not finish"
        listener.close()
        return hashlib.sha256(payload).hexdigest(), received.hexdigest()

    def close(self):
        if self.pinger is not None:
            self.pinger.stop()
        self.wg.close()
        stop_process(self.relay)
