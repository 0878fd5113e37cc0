"""WireGuard over the WebSocket and HTTP transports, through the client relay.

A real WireGuard client in the client namespace talks to a local
`orbmesh-wg relay`, which carries its datagrams to the server's API; the
server relays them to its own WireGuard on loopback.
"""
import hashlib
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from orbmesh_relay.framing import BATCH_TYPE

from .netns import unique_ifname
from .stack import API_PORT, SERVER_ADDR, VENV_BIN, wait_for
from .wgclient import WgClient
from .wsclient import RawWebSocket

pytestmark = pytest.mark.e2e
GATEWAY = "10.8.0.1"
STATUS = re.compile(r"relay (\w+) up=(\d+)/(\d+) down=(\d+)/(\d+) dropped=(\d+) reconnects=(\d+) "
                    r"connected=(yes|no)")


# The bulk transfer's listener on the node's gateway: tenant isolation closes the node to clients but
# for the ports opened (docs/security.md, Tenant isolation).
NODE_PORT = 40300


@pytest.fixture
def stack_env():
    return {"ORBMESH_WS_PING_INTERVAL": "2", "ORBMESH_CLIENT_NODE_PORTS": str(NODE_PORT)}


@pytest.fixture
def stack_workers():
    # HTTP tunnel sessions live in one worker process; the documented
    # deployment gives each device one single-worker instance (README).
    return 1


class Relay:
    """`orbmesh-wg relay` in the client namespace, with its status lines collected."""

    def __init__(self, ns, transport, token, port, session=None):
        argv = [str(VENV_BIN / "orbmesh-wg"), "relay", "--transport", transport,
                "--url", "http://%s:%d" % (SERVER_ADDR, API_PORT), "--listen", "127.0.0.1:%d" % port,
                "--status-interval", "1"]
        if session:
            argv += ["--session", session]
        env = dict(os.environ, ORBMESH_RELAY_TOKEN=token)
        self.proc = ns.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.port = port
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, ""):
            self.log.append(line)
            if STATUS.search(line):
                self.lines.put(line)

    def status(self):
        """The next status line after now, as a dict."""
        while not self.lines.empty():
            self.lines.get_nowait()
        self.proc.send_signal(signal.SIGUSR1)
        match = STATUS.search(self.lines.get(timeout=15))
        keys = ("transport", "up", "up_bytes", "down", "down_bytes", "dropped", "reconnects", "connected")
        values = match.groups()
        return {k: (v if k in ("transport", "connected") else int(v)) for k, v in zip(keys, values)}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


@pytest.fixture
def tunnel(stack):
    """Factory: (transport, device) -> (WgClient, Relay, connect body), all torn down afterwards."""
    made = []

    def make(transport, device, session=None):
        client = WgClient(stack.client, unique_ifname("omt"))
        status, body = stack.connect("tunnel-user", device, client.public_key)
        assert status == 200, body
        port = 40000 + len(made)
        relay = Relay(stack.client, transport, stack.token("tunnel-user", device), port, session)
        made.append((client, relay))
        client.configure(server_public_key=body["serverPublicKey"], endpoint="127.0.0.1:%d" % port,
                         address_cidr=body["ip"], allowed_ips=[GATEWAY + "/32"], mtu=body["mtu"],
                         keepalive=body["keepalive"])
        return client, relay, body

    yield make
    for client, relay in made:
        relay.stop()
        client.close()


def ping_through(client, what):
    assert wait_for(lambda: client.ping(GATEWAY, count=1, timeout=2), timeout=45, what=what)


def transfer(stack, direction, client_ip, size=8 * 1024 * 1024):
    """Send `size` random bytes over TCP through the tunnel; return (sent digest, received digest)."""
    payload = os.urandom(size)
    listen_ns, dial_ns = (stack.server, stack.client) if direction == "up" else (stack.client, stack.server)
    listen_addr = GATEWAY if direction == "up" else None
    listener = listen_ns.socket_in(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((listen_addr or "0.0.0.0", NODE_PORT if direction == "up" else 0))
    listener.listen(1)
    listener.settimeout(60)
    port = listener.getsockname()[1]
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
    dial.settimeout(120)
    target = GATEWAY if direction == "up" else client_ip
    dial.connect((target, port))
    dial.sendall(payload)
    dial.close()
    assert done.wait(180), "transfer did not finish"
    listener.close()
    return hashlib.sha256(payload).hexdigest(), received.hexdigest()


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_handshake_ping_and_bulk_transfer(stack, tunnel, transport):
    client, relay, body = tunnel(transport, "bulk-" + transport)
    ping_through(client, "ping over %s" % transport)
    for direction in ("up", "down"):
        sent, got = transfer(stack, direction, body["ip"].split("/")[0])
        assert sent == got, "%s transfer over %s arrived corrupted" % (direction, transport)
    status = relay.status()
    assert status["transport"] == transport and status["connected"] == "yes"
    assert status["up_bytes"] > 8 * 1024 * 1024 and status["down_bytes"] > 8 * 1024 * 1024


def test_hundred_thousand_frames_down_the_websocket(stack, tunnel):
    client, relay, body = tunnel("ws", "frames")
    ping_through(client, "ping over ws")
    tunnel_ip = body["ip"].split("/")[0]
    sink = stack.client.socket_in(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((tunnel_ip, 9999))
    sender = stack.server.socket_in(socket.AF_INET, socket.SOCK_DGRAM)
    start = relay.status()["down"]
    sent = 0
    # Paced so that most arrive; keep going until the relay has taken 100,000 frames off the socket.
    while relay.status()["down"] - start < 100_000 and sent < 400_000:
        for _ in range(10_000):
            sender.sendto(b"x" * 64, (tunnel_ip, 9999))
            sent += 1
            if sent % 500 == 0:
                time.sleep(0.005)
    status = relay.status()
    sender.close()
    sink.close()
    assert status["down"] - start >= 100_000, status
    assert status["reconnects"] == 0 and status["connected"] == "yes", status
    assert not any("error" in line.lower() for line in relay.log), relay.log[-5:]


def test_client_that_stops_reading_is_dropped_and_others_keep_working(stack, tunnel):
    stalled, stalled_relay, stalled_body = tunnel("ws", "stalled")
    healthy, healthy_relay, _ = tunnel("ws", "healthy")
    ping_through(stalled, "ping over ws (stalled client)")
    ping_through(healthy, "ping over ws (healthy client)")
    rss_before = stack.app_rss()
    stalled_relay.proc.send_signal(signal.SIGSTOP)
    try:
        sender = stack.server.socket_in(socket.AF_INET, socket.SOCK_DGRAM)
        target = (stalled_body["ip"].split("/")[0], 9999)
        for i in range(40_000):  # about 56 MB towards a client that reads nothing
            sender.sendto(b"y" * 1400, target)
            if i % 200 == 0:
                time.sleep(0.002)
        sender.close()
        assert healthy.ping(GATEWAY, count=3, timeout=2), "the other session stopped working"
        growth = stack.app_rss() - rss_before
        assert growth < 32 * 1024 * 1024, "app memory grew by %d bytes" % growth
        wait_for(lambda: "tunnel ws session end" in stack.app_log.read_text()
                 and "device=stalled" in stack.app_log.read_text(), timeout=30,
                 what="the server to give up on the stalled client")
    finally:
        stalled_relay.proc.send_signal(signal.SIGCONT)
    ping_through(stalled, "ping after the stalled relay reconnects")
    assert stalled_relay.status()["reconnects"] >= 1


def test_broken_batch_leaves_the_http_session_intact(stack, tunnel):
    client, relay, _ = tunnel("http", "framing", session="e2e-framing")
    ping_through(client, "ping over http")
    headers = {"Authorization": "Bearer " + stack.token("tunnel-user", "framing"), "Content-Type": BATCH_TYPE,
               "X-Tunnel-Session": "e2e-framing", "X-Tunnel-Wait": "0"}
    url = "http://%s:%d/wireguard/tunnel" % (SERVER_ADDR, API_PORT)
    # A record longer than the body, one of length 0, a megabyte of 1-byte records (shorter than any
    # WireGuard message: refused at the first), a body over the limit.
    for body in (b"\x00\x50" + b"\x04" * 10, b"\x00\x00", b"\x00\x01x" * (1024 * 1024 // 3),
                 b"\x01" * (2 * 1024 * 1024)):
        status, _, _ = stack.client.http("POST", url, headers=headers, body=body)
        assert status in (400, 413)
    assert client.ping(GATEWAY, count=3, timeout=2), "the session broke after bad requests"
    assert relay.status()["reconnects"] == 0


@pytest.mark.parametrize("stack_env", [{"ORBMESH_WS_PING_INTERVAL": "2", "ORBMESH_WS_IDLE_TIMEOUT": "4"}])
def test_only_wireguard_datagrams_keep_a_websocket_session_open(stack, tunnel):
    """A client that sends only junk is closed as idle; a real WireGuard client's session lives on (issue 23)."""
    idle = 4
    client, relay, _ = tunnel("ws", "idle-real")
    ping_through(client, "ping over ws")
    # The relay connects at once; if the client took longer than the idle timeout to send its first
    # datagram, that connection closed as idle and the relay reconnected, rightly: count from here.
    reconnects = relay.status()["reconnects"]
    ended_before = _session_ends(stack, "idle-real")
    sock = stack.client.socket_in(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect((SERVER_ADDR, API_PORT))
    junk = RawWebSocket(sock, "%s:%d" % (SERVER_ADDR, API_PORT),
                        headers=[("Authorization", "Bearer " + stack.token("tunnel-user", "idle-junk"))])
    try:
        start = time.monotonic()
        # Both send twice a second for three idle timeouts: the relay real WireGuard pings, the other junk
        # (and it answers the server's pings, so only the idle timer can close it).
        while time.monotonic() - start < 3 * idle:
            assert client.ping(GATEWAY, count=1, timeout=2), "the real tunnel stopped"
            if junk.closed_with is None:
                try:
                    junk.send_bytes(b"\x09" * 64)
                except OSError:
                    pass  # closed under us: pump reads the close frame
                junk.pump(timeout=0.5)
            else:
                time.sleep(0.5)
        assert junk.closed_with == 1000, "the junk-only session was not closed as idle"
        assert relay.status()["reconnects"] == reconnects, "the real WireGuard session was closed"
        junk_end = _session_ends(stack, "idle-junk")
        assert len(junk_end) == 1 and "reason=idle" in junk_end[0] and "up=0/0" in junk_end[0], junk_end
        assert _session_ends(stack, "idle-real") == ended_before
    finally:
        junk.close()


def _session_ends(stack, device):
    return [line for line in stack.app_log.read_text().splitlines()
            if "tunnel ws session end" in line and "device=%s " % device in line]


def test_generic_websocket_client_in_binary_mode(stack):
    """websocat -b, as in the reference's example: one UDP datagram per binary message."""
    client = WgClient(stack.client, unique_ifname("omg"))
    try:
        status, body = stack.connect("tunnel-user", "websocat", client.public_key)
        assert status == 200, body
        port = 40500
        token = stack.token("tunnel-user", "websocat")
        # -H takes several values, so it goes after the two addresses.
        stack.client.popen([str(VENV_BIN / "websocat"), "-b", "udp-l:127.0.0.1:%d" % port,
                            "ws://%s:%d/wireguard/ws" % (SERVER_ADDR, API_PORT),
                            "-H", "Authorization: Bearer " + token],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client.configure(server_public_key=body["serverPublicKey"], endpoint="127.0.0.1:%d" % port,
                         address_cidr=body["ip"], allowed_ips=[GATEWAY + "/32"], mtu=body["mtu"],
                         keepalive=body["keepalive"])
        ping_through(client, "ping through websocat")
    finally:
        client.close()


def test_single_datagram_post_as_in_the_reference(stack):
    """A real handshake initiation POSTed raw (curl --data-binary) gets WireGuard's response back."""
    client = WgClient(stack.client, unique_ifname("oms"))
    capture = stack.client.socket_in(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        capture.bind(("127.0.0.1", 0))
        capture.settimeout(10)
        status, body = stack.connect("tunnel-user", "single", client.public_key)
        assert status == 200, body
        client.configure(server_public_key=body["serverPublicKey"],
                         endpoint="127.0.0.1:%d" % capture.getsockname()[1], address_cidr=body["ip"],
                         allowed_ips=[GATEWAY + "/32"], mtu=body["mtu"], keepalive=0)
        threading.Thread(target=client.ping, args=(GATEWAY, 1, 1), daemon=True).start()
        initiation, _ = capture.recvfrom(65535)
        assert initiation[0] == 1 and len(initiation) == 148
        got, headers, raw = stack.client.http(
            "POST", "http://%s:%d/wireguard/tunnel" % (SERVER_ADDR, API_PORT), body=initiation,
            headers={"Authorization": "Bearer " + stack.token("tunnel-user", "single"),
                     "Content-Type": "application/octet-stream"})
        assert got == 200 and headers["Content-Type"] == "application/octet-stream"
        assert raw[0] == 2 and len(raw) == 92, "expected a WireGuard handshake response"
    finally:
        capture.close()
        client.close()
