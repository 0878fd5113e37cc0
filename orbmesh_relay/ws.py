"""WebSocket transport of the client relay: GET /wireguard/ws
(docs/tunnel-protocol.md).  It offers the ``orbmesh.batch.v1`` subprotocol:
where the server takes it, each binary message carries every datagram that
was waiting (batch framing, both ways); where it does not, one datagram per
message, as any WebSocket client would.

Given the Relay it serves, it uses the relay's attributes (url, token,
stats, deliver) and never imports relay.py.

Two threads: the relay's uplink thread sends (send()); "ws" owns the
connection, (re)connects with backoff, reads the socket and delivers what
arrives.  Liveness (liveness.py): anything from the server answers; when
what the relay sent goes unanswered the monitor's tick() sends a ping,
and a path silent past the deadline, or whose local address is no longer
the route's (route.py), is dropped and made again at once.  A message
that does not parse (a text message, broken batch framing) is a failed
path too: the connection is dropped and made again.
The WebSocket protocol is websockets' sans-I/O one, driven straight from
these two threads: the library's own client adds a third thread that reads
the socket and hands every message over, and with eight tunnels on two
cores those hand-offs doubled the relay's CPU per GB (docs/benchmarks.md).
"""
import logging
import os
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from . import route
from .common import Transport, Unauthorized, unauthorized_message
from .framing import BATCH_PROTOCOL, MAX_BATCH_MESSAGE, FramingError, decode_batch, is_wireguard, pack_batches

log = logging.getLogger(__name__)

PATH = "/wireguard/ws"
USER_AGENT = "orbmesh-wg-relay"
OPEN_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0  # a server that takes nothing for this long is gone
CLOSE_TIMEOUT = 2.0
RECEIVE_BYTES = 1 << 18
RTT_EVERY = 5.0  # a ping this often, for the round-trip time (and the liveness check when one is due)


def ws_uri(url):
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + PATH, "", ""))


class Connection:
    """One WebSocket connection: a socket and the sans-I/O protocol, shared by both threads.

    The lock keeps the protocol's state and the bytes it writes in order:
    the up thread sends messages, the down thread answers pings and closes.
    """

    def __init__(self, sock, protocol, pending):
        self.sock = sock
        self.protocol = protocol
        self.pending = pending  # frames that came with the handshake's answer
        self.batched = protocol.subprotocol == BATCH_PROTOCOL
        self._lock = threading.Lock()

    def send(self, messages):
        with self._lock:
            for message in messages:
                self.protocol.send_binary(message)
            self._flush()

    def feed(self, data):
        """Bytes from the socket (b"" at its end) -> the frames they complete."""
        with self._lock:
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            events = self.protocol.events_received()
            self._flush()  # pongs, and the answer to a close
            return events

    def _flush(self):
        data = self.protocol.data_to_send()
        if data and data[-1] == b"":  # the protocol is done with the connection
            data.pop()
        if data:
            self.sock.sendall(b"".join(data))

    def ping(self, payload):
        """A ping, unless a send holds the connection right now (then False: the monitor must not wait)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.protocol.send_ping(payload)
            self._flush()
            return True
        except (OSError, WebSocketException):
            return False
        finally:
            self._lock.release()

    def abort(self):
        """From any thread, without waiting: the socket ends, both threads' reads and writes fail."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        # A close frame if the connection takes one soon; an up thread stuck
        # in a send to a server that reads nothing must not hold this for long.
        if self._lock.acquire(timeout=CLOSE_TIMEOUT):
            try:
                if self.protocol.state is State.OPEN:
                    self.sock.settimeout(CLOSE_TIMEOUT)
                    self.protocol.send_close(1000)
                    self._flush()
            except OSError:
                pass
            finally:
                self._lock.release()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def release(self):
        self.sock.close()


def _handshake(uri, token, ssl_context):
    """Open a Connection to `uri`, or raise Unauthorized, OSError or WebSocketException."""
    wsuri = parse_uri(uri)
    sock = socket.create_connection((wsuri.host, wsuri.port), timeout=OPEN_TIMEOUT)
    try:
        # Every write is a whole batch already; Nagle would only delay a lone one.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if wsuri.secure:
            sock = ssl_context.wrap_socket(sock, server_hostname=wsuri.host)
        # The server never negotiates compression; WireGuard data does not compress.
        protocol = ClientProtocol(wsuri, subprotocols=[BATCH_PROTOCOL], max_size=MAX_BATCH_MESSAGE)
        request = protocol.connect()
        request.headers["Authorization"] = "Bearer " + token
        request.headers["User-Agent"] = USER_AGENT
        protocol.send_request(request)
        sock.sendall(b"".join(protocol.data_to_send()))
        pending = []
        while protocol.state is State.CONNECTING:
            data = sock.recv(RECEIVE_BYTES)
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            if protocol.handshake_exc is not None:
                raise protocol.handshake_exc
            pending = [event for event in protocol.events_received() if not isinstance(event, Response)]
        sock.settimeout(SEND_TIMEOUT)
        return Connection(sock, protocol, pending)
    except BaseException:
        sock.close()
        raise


class WsTransport(Transport):
    name = "ws"

    def __init__(self, relay):
        super().__init__(relay)
        self.uri = ws_uri(relay.url)
        self._lock = threading.Lock()
        self._conn = None
        self._pings = {}  # payload -> when it was sent
        self._last_ping = 0.0
        self._last_route = 0.0

    def workers(self):
        return [(self._downlink, "relay-ws")]

    def _connect(self):
        ssl_context = self.relay.ssl_context if self.uri.startswith("wss:") else None
        return _handshake(self.uri, self.relay.token, ssl_context)

    def send(self, batch):
        relay = self.relay
        conn = self._conn
        if conn is None:
            # WireGuard retransmits its handshakes; queueing stale ones
            # for a connection that may take 30 s would only add delay.
            relay.stats.drop(len(batch))
            return
        try:
            conn.send(pack_batches(batch) if conn.batched else batch)
        except (OSError, WebSocketException) as exc:
            log.debug("send failed: %s", exc)
            relay.stats.drop(len(batch))
            return
        self.live.sent(time.monotonic())
        relay.stats.up(len(batch), sum(map(len, batch)), self.name)

    def _downlink(self):
        relay = self.relay
        backoff = relay.backoff()
        first = True
        while not self.stopping.is_set():
            if not first:
                relay.stats.reconnect()
                if backoff.wait(self.stopping):
                    return
            first = False
            try:
                conn = self._connect()
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    raise Unauthorized(unauthorized_message(status)) from None
                self.failures += 1
                log.warning("websocket refused: HTTP %d; retrying", status)
                continue
            except (OSError, WebSocketException) as exc:
                self.failures += 1
                if not self.stopping.is_set():
                    log.warning("websocket connect to %s failed: %s; retrying", self.uri, exc)
                continue
            backoff.reset()
            with self._lock:
                if self.stopping.is_set():
                    conn.close()
                    conn.release()
                    return
                self._conn = conn
            self.failures = 0
            self.live.reset()
            self.ready = True
            log.info("websocket connected to %s", self.uri)
            try:
                self._receive(conn)
            finally:
                with self._lock:
                    self._conn = None
                self.ready = False
                conn.close()
                conn.release()

    def _receive(self, conn):
        relay = self.relay
        parts, size = [], 0  # a fragmented message so far
        try:
            events = conn.pending
            while True:
                if events:
                    self.live.answered(time.monotonic())  # any frame from the server is a sign of life
                for frame in events:
                    if frame.opcode is Opcode.PONG:
                        self._pong(frame.data)
                    if frame.opcode not in (Opcode.BINARY, Opcode.CONT, Opcode.TEXT):
                        continue  # ping, pong, close: the protocol has answered them
                    parts.append(frame)
                    size += len(frame.data)
                    if not frame.fin:
                        continue
                    self._deliver(conn, parts, size)
                    parts, size = [], 0
                if conn.protocol.state is State.CLOSED or conn.protocol.close_expected():
                    break
                data = self._read(conn)
                events = conn.feed(data)
                if not data:
                    break
            if not self.stopping.is_set():
                log.warning("websocket closed (code %s); reconnecting", conn.protocol.close_code)
        except (OSError, WebSocketException, FramingError) as exc:
            if not self.stopping.is_set():
                log.warning("websocket lost: %s; reconnecting", exc)

    def _read(self, conn):
        while True:
            try:
                return conn.sock.recv(RECEIVE_BYTES)
            except TimeoutError:
                if self.stopping.is_set():
                    return b""
                continue  # an idle tunnel; the relay's liveness and the server's pings end it

    def _deliver(self, conn, parts, size):
        """One whole message; one that does not parse raises FramingError: the path has failed."""
        relay = self.relay
        if parts[0].opcode is not Opcode.BINARY:
            raise FramingError("the server sent a text message")
        message = parts[0].data if len(parts) == 1 else b"".join(p.data for p in parts)
        if not conn.batched:
            datagrams = [bytes(message)] if size else []
        else:
            datagrams = decode_batch(bytes(message))
        good = [d for d in datagrams if is_wireguard(d)]
        if len(good) < len(datagrams):
            relay.stats.drop(len(datagrams) - len(good))
        if good:
            relay.deliver(good, self)

    def _pong(self, payload):
        sent = self._pings.pop(bytes(payload), None)
        if sent is not None:
            self.live.sample(time.monotonic() - sent)

    def tick(self, now):
        conn = self._conn
        if conn is None:
            return None
        if self.live.dead(now):
            return "no answer over ws for %.1f s" % self.live.silent_for(now)
        if self.live.needs_check(now) or now - self._last_ping >= RTT_EVERY:
            payload = os.urandom(4)
            if conn.ping(payload):
                self._pings = {p: t for p, t in self._pings.items() if now - t < 60}
                self._pings[payload] = now
                self._last_ping = now
                self.live.checked(now)
        if now - self._last_route >= route.CHECK_EVERY:
            self._last_route = now
            return route.moved(conn.sock)
        return None

    def kick(self, reason):
        conn = self._conn
        if conn is not None:
            conn.abort()

    def close(self):
        super().close()
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.close()
