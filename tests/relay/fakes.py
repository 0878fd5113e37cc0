"""Fakes for the client relay's tests: tiny tunnel servers that echo, a UDP
stand-in for local WireGuard.  Everything on 127.0.0.1, every wait bounded."""
import base64
import collections
import http.server
import json
import os
import socket
import struct
import threading
import time

from websockets.sync.server import serve

from orbmesh_relay import probe

TOKEN = "relay-test-token-0123456789"


def wg_datagram(seq, size=64):
    """WireGuard-shaped: type 4 (data), three zero bytes, a counter, padding."""
    head = b"\x04\x00\x00\x00" + struct.pack("!Q", seq)
    return head + bytes((seq + i) % 256 for i in range(max(32, size) - len(head)))


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


class UdpPeer:
    """Plays local WireGuard: sends to the relay's port, reads what comes back."""

    def __init__(self, relay_address):
        self.relay_address = tuple(relay_address)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for a burst of a hundred full-size datagrams, as WireGuard's own socket has.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)

    def send(self, datagram):
        self.sock.sendto(datagram, self.relay_address)

    def receive_all(self, count, timeout=10.0):
        """Up to count datagrams, stopping at the timeout."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                data, _ = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            got.append(data)
        return got

    def close(self):
        self.sock.close()


def encode(datagrams):
    return b"".join(struct.pack("!H", len(d)) + d for d in datagrams)


def decode(body):
    out, offset = [], 0
    while offset < len(body):
        (length,) = struct.unpack_from("!H", body, offset)
        out.append(body[offset + 2:offset + 2 + length])
        offset += 2 + length
    assert offset == len(body), "batch body ends inside a record"
    return out


class FakeTunnelServer:
    """POST /wireguard/tunnel with batch bodies; echoes each datagram after a
    short hold, so echoes usually come back on the parked request.

    `gate` (an Event, set by default) holds requests that carry datagrams
    until the test opens it.
    """

    ECHO_DELAY = 0.05
    HOLD = 2.0  # the default wait; short so a stop is quick

    def __init__(self, port=0, tls=None):
        self.lock = threading.Condition()
        self.queues = collections.defaultdict(collections.deque)
        self.requests = []  # (headers dict, datagrams) per request, in arrival order
        self.upstream = []  # every datagram received
        self.in_flight = 0
        self.max_in_flight = 0
        self.blocked = 0  # requests with datagrams waiting at the gate
        self.gate = threading.Event()
        self.gate.set()
        self.probe = None  # a FakeNode whose probe tickets POST /wireguard/probe hands out
        self.ticket_requests = 0
        self.stopped = False
        self.connections = set()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handler(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with fake.lock:
                    fake.connections.add(self.connection)

            def finish(self):
                with fake.lock:
                    fake.connections.discard(self.connection)
                super().finish()

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != "Bearer " + TOKEN:
                    return self._answer(401, b'{"error": {"code": "UNAUTHORIZED"}}', "application/json")
                if self.path == "/wireguard/probe":
                    status, answer = fake.ticket()
                    return self._answer(status, json.dumps(answer).encode(), "application/json")
                datagrams = decode(body)
                headers = dict(self.headers.items())
                with fake.lock:
                    fake.requests.append((headers, datagrams))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._tunnel(headers, datagrams)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _tunnel(self, headers, datagrams):
                session = headers.get("X-Tunnel-Session", "default")
                if datagrams:
                    with fake.lock:
                        fake.blocked += 1
                    fake.gate.wait(10)
                    with fake.lock:
                        fake.blocked -= 1
                        fake.upstream.extend(datagrams)
                    timer = threading.Timer(fake.ECHO_DELAY, fake.echo, (session, datagrams))
                    timer.daemon = True
                    timer.start()
                wait = float(headers.get("X-Tunnel-Wait", fake.HOLD))
                deadline = time.monotonic() + wait
                with fake.lock:
                    queue = fake.queues[session]
                    while not queue and not fake.stopped and time.monotonic() < deadline:
                        fake.lock.wait(deadline - time.monotonic())
                    answer = list(queue)
                    queue.clear()
                if fake.stopped:
                    return
                self._answer(200, encode(answer), "application/x-wireguard-batch")

            def _answer(self, status, body, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the relay stopped or gave up on this request

        return Handler

    def ticket(self):
        """POST /wireguard/probe: (status, JSON answer); set `probe` to a FakeNode to hand out its tickets."""
        with self.lock:
            self.ticket_requests += 1
        if self.probe is None:
            return 404, {"success": False, "error": {"code": "NOT_FOUND", "message": "UDP probes are off"}}
        ticket, key = probe.new_ticket(self.probe.secret)
        return 200, {"success": True, "port": self.probe.probe_port, "ticket": base64.b64encode(ticket).decode(),
                     "key": base64.b64encode(key).decode(), "expiresIn": probe.TICKET_TTL, "serverTime": time.time()}

    def echo(self, session, datagrams):
        with self.lock:
            self.queues[session].extend(datagrams)
            self.lock.notify_all()

    def posts_with_data(self):
        with self.lock:
            return [(h, d) for h, d in self.requests if d]

    def stop(self):
        """Like a server going away: listening socket and every connection."""
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
            connections = list(self.connections)
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FakeWsServer:
    """GET /wireguard/ws: checks the token, echoes binary messages."""

    def __init__(self, tls=None, subprotocols=None):
        self.requests = []  # handshake request headers
        self.connections = []
        self.refuse = None  # a status (401, 403, ...) every upgrade gets
        self.received = []
        self.lock = threading.Lock()
        # compression left at the library default (deflate offered if asked)
        # so that a client asking for it would get it and the test would see.
        self.server = serve(self._handler, "127.0.0.1", 0, process_request=self._check,
                            max_size=65537, ssl=tls, subprotocols=subprotocols)
        self.port = self.server.socket.getsockname()[1]
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _check(self, connection, request):
        with self.lock:
            self.requests.append(request)
        if request.path != "/wireguard/ws":
            return connection.respond(404, "not found\n")
        if request.headers.get("Authorization") != "Bearer " + TOKEN:
            return connection.respond(401, '{"error": {"code": "UNAUTHORIZED"}}\n')
        if self.refuse:
            return connection.respond(self.refuse, '{"error": {"code": "REFUSED"}}\n')
        return None

    def _handler(self, connection):
        with self.lock:
            self.connections.append(connection)
        for message in connection:
            with self.lock:
                self.received.append(message)
            if isinstance(message, bytes):
                connection.send(message)

    def drop_all(self):
        """Close every open connection from the server's side."""
        with self.lock:
            connections = list(self.connections)
            self.connections.clear()
        for connection in connections:
            connection.close(1011, "test drop")

    def stop(self):
        self.drop_all()
        self.server.shutdown()


def self_signed(directory):
    """A certificate for 127.0.0.1 and its key, as PEM files; returns (cert, key) paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class FakeNode:
    """A node's UDP side on 127.0.0.1: "WireGuard" echoes every datagram, and a
    probe echo answers probes made with its tickets (orbmesh_relay/probe.py).

    `blocked` drops everything both ways, as a middlebox blocking UDP would.
    """

    def __init__(self):
        self.secret = os.urandom(32)
        self.wireguard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.wireguard.bind(("127.0.0.1", 0))
        self.probes = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.probes.bind(("127.0.0.1", 0))
        self.port = self.wireguard.getsockname()[1]
        self.probe_port = self.probes.getsockname()[1]
        self.endpoint = "127.0.0.1:%d" % self.port
        self.blocked = False
        self.received = []  # (datagram, source) at "WireGuard"
        self.probed = 0  # probes answered or refused
        self.probes_seen = 0  # every datagram at the probe port, blocked or not
        self.stopped = False
        self.threads = [threading.Thread(target=self._serve, args=(sock, handle), daemon=True)
                        for sock, handle in ((self.wireguard, self._echo), (self.probes, self._answer))]
        for thread in self.threads:
            thread.start()

    def _serve(self, sock, handle):
        sock.settimeout(0.1)
        while not self.stopped:
            try:
                data, source = sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if sock is self.probes:
                self.probes_seen += 1
            if not self.blocked:
                handle(sock, data, source)

    def _echo(self, sock, data, source):
        self.received.append((data, source))
        sock.sendto(data, source)

    def _answer(self, sock, data, source):
        self.probed += 1
        reply = probe.answer(data, source, self.secret)
        if reply is not None:
            sock.sendto(reply, source)

    def stop(self):
        self.stopped = True
        for thread in self.threads:
            thread.join(2)
        self.wireguard.close()
        self.probes.close()


class DarkProxy:
    """A TCP proxy on 127.0.0.1 to `port`; go_dark() makes every connection through it a path gone
    dark: both ends stay open, bytes are taken and dropped, nothing arrives (no reset, no close)."""

    def __init__(self, port):
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.dark = False
        self.accepted = 0
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink):
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    return
                if not self.dark:
                    sink.sendall(data)
            except OSError:
                return

    def go_dark(self):
        self.dark = True

    def stop(self):
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
