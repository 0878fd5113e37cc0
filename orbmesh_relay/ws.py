"""WebSocket transport of the client relay: GET /wireguard/ws
(docs/tunnel-protocol.md).  It offers the ``orbmesh.batch.v1`` subprotocol:
where the server takes it, each binary message carries every datagram that
was waiting (batch framing, both ways); where it does not, one datagram per
message, as any WebSocket client would.

Given the Relay it serves, it uses the relay's attributes (url, token,
stats, stopping, local_batches, deliver) and never imports relay.py.

Two threads: "up" reads local UDP and sends; "down" owns the connection,
(re)connects with backoff, reads the socket and delivers what arrives.
The WebSocket protocol is websockets' sans-I/O one, driven straight from
these two threads: the library's own client adds a third thread that reads
the socket and hands every message over, and with eight tunnels on two
cores those hand-offs doubled the relay's CPU per GB (docs/benchmarks.md).
"""
import logging
import socket
import threading
from urllib.parse import urlsplit, urlunsplit

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from .common import Unauthorized, unauthorized_message
from .framing import BATCH_PROTOCOL, MAX_BATCH_MESSAGE, FramingError, decode_batch, pack_batches

log = logging.getLogger(__name__)

PATH = "/wireguard/ws"
USER_AGENT = "orbmesh-wg-relay"
OPEN_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0  # a server that takes nothing for this long is gone
CLOSE_TIMEOUT = 2.0
RECEIVE_BYTES = 1 << 18


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


class WsTransport:
    def __init__(self, relay):
        self.relay = relay
        self.uri = ws_uri(relay.url)
        self._lock = threading.Lock()
        self._conn = None

    def workers(self):
        return [(self._uplink, "relay-ws-up"), (self._downlink, "relay-ws-down")]

    def _connect(self):
        ssl_context = self.relay.ssl_context if self.uri.startswith("wss:") else None
        return _handshake(self.uri, self.relay.token, ssl_context)

    def _uplink(self):
        relay = self.relay
        for batch in relay.local_batches():
            conn = self._conn
            if conn is None:
                # WireGuard retransmits its handshakes; queueing stale ones
                # for a connection that may take 30 s would only add delay.
                relay.stats.drop(len(batch))
                continue
            try:
                conn.send(pack_batches(batch) if conn.batched else batch)
            except (OSError, WebSocketException) as exc:
                log.debug("send failed: %s", exc)
                relay.stats.drop(len(batch))
                continue
            relay.stats.up(len(batch), sum(map(len, batch)))

    def _downlink(self):
        relay = self.relay
        backoff = relay.backoff()
        first = True
        while not relay.stopping.is_set():
            if not first:
                relay.stats.reconnect()
                if backoff.wait(relay.stopping):
                    return
            first = False
            try:
                conn = self._connect()
            except InvalidStatus as exc:
                if exc.response.status_code == 401:
                    raise Unauthorized(unauthorized_message()) from None
                log.warning("websocket refused: HTTP %d; retrying", exc.response.status_code)
                continue
            except (OSError, WebSocketException) as exc:
                log.warning("websocket connect to %s failed: %s; retrying", self.uri, exc)
                continue
            backoff.reset()
            with self._lock:
                if relay.stopping.is_set():
                    conn.close()
                    conn.release()
                    return
                self._conn = conn
            relay.stats.set_connected(True)
            log.info("websocket connected to %s", self.uri)
            try:
                self._receive(conn)
            finally:
                with self._lock:
                    self._conn = None
                relay.stats.set_connected(False)
                conn.close()
                conn.release()

    def _receive(self, conn):
        relay = self.relay
        parts, size = [], 0  # a fragmented message so far
        try:
            events = conn.pending
            while True:
                for frame in events:
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
            if not relay.stopping.is_set():
                log.warning("websocket closed (code %s); reconnecting", conn.protocol.close_code)
        except (OSError, WebSocketException) as exc:
            if not relay.stopping.is_set():
                log.warning("websocket lost: %s; reconnecting", exc)

    @staticmethod
    def _read(conn):
        while True:
            try:
                return conn.sock.recv(RECEIVE_BYTES)
            except TimeoutError:
                continue  # an idle tunnel; WireGuard's keepalives and the server's pings end it

    def _deliver(self, conn, parts, size):
        relay = self.relay
        if parts[0].opcode is not Opcode.BINARY or not size:
            relay.stats.drop()
            return
        message = parts[0].data if len(parts) == 1 else b"".join(p.data for p in parts)
        if not conn.batched:
            relay.deliver([bytes(message)])
            return
        try:
            datagrams = decode_batch(bytes(message))
        except FramingError:
            relay.stats.drop()
            return
        relay.deliver(datagrams)

    def close(self):
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.close()
