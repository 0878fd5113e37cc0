"""HTTP transport of the client relay: POST /wireguard/tunnel with batch
bodies (docs/tunnel-protocol.md).

Threads: the relay's uplink thread puts local UDP datagrams into a bounded
queue (send()); one "receiver" keeps a request parked (empty body, server's default wait) so
downstream datagrams arrive as soon as WireGuard sends them; N "senders"
each take what is queued, send it as one batch with X-Tunnel-Wait: 0 and
deliver whatever the answer carries.  Each thread has its own keep-alive
connection, so neither direction waits for the other.

Every request costs the server the same, whatever it carries (gunicorn,
Flask, the token, a TCP answer: 80% of the worker under a bulk upload,
docs/benchmarks.md).  So while an upload is under way (the last batch held
BULK_BYTES or more) a sender waits up to FILL_WAIT for FILL_BYTES, and the
receiver waits PARK_PAUSE before parking again, leaving the downstream
(the upload's TCP ACKs) to the senders' answers.  A ping or a keepalive
never waits.

Liveness (liveness.py): a sending request in flight is the check; its
answer, or any answer, clears it.  Unanswered past the deadline, or a
connection whose local address is no longer the route's (route.py): every
connection is dropped and made again at once.  An answer that does not
parse is a failed request, retried on a new connection.

Like ws.py, it gets the Relay passed in and never imports relay.py.
"""
import collections
import http.client
import logging
import socket
import threading
import time
from urllib.parse import urlsplit

from . import route
from .common import Transport, Unauthorized, unauthorized_message
from .framing import BATCH_TYPE, FramingError, decode_batch, encode_batch, is_wireguard, record_size

log = logging.getLogger(__name__)

PATH = "/wireguard/tunnel"
MAX_BATCH_BYTES = 256 * 1024
QUEUE_LIMIT = 1024  # datagrams; the same bound as the server's downstream queue
PARKED_TIMEOUT = 90.0  # well above the server's default hold (20 s)
SEND_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0  # a new connection (and its TLS handshake); liveness watches the requests
BULK_BYTES = 32 * 1024
FILL_BYTES = 128 * 1024
FILL_WAIT = 0.002
PARK_PAUSE = 0.004


class TunnelError(Exception):
    """A response the relay cannot use; the thread backs off and retries."""


class _Channel:
    """One thread's keep-alive connection."""

    def __init__(self, transport, timeout):
        self.transport = transport
        self.timeout = timeout
        self.conn = None

    def post(self, body, wait=None):
        fresh = self.conn is None
        if fresh:
            self.conn = self.transport.connection(self.timeout)
        try:
            return self._exchange(body, wait)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            if fresh or self.transport.stopping.is_set():
                raise
        # The server may close an idle keep-alive connection at any moment;
        # one retry on a new connection is routine, not a reconnect.
        self.close()
        self.conn = self.transport.connection(self.timeout)
        return self._exchange(body, wait)

    def _exchange(self, body, wait):
        headers = {
            "Authorization": "Bearer " + self.transport.relay.token,
            "Content-Type": BATCH_TYPE,
            "X-Tunnel-Session": self.transport.relay.session,
        }
        if wait is not None:
            headers["X-Tunnel-Wait"] = wait
        self.conn.request("POST", self.transport.path, body=body, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.status in (401, 403):
            raise Unauthorized(unauthorized_message(response.status))
        if response.status == 204:
            return []
        if response.status != 200:
            raise TunnelError("HTTP %d" % response.status)
        if not (response.getheader("Content-Type") or "").startswith(BATCH_TYPE):
            raise TunnelError("answer is not a batch: %r" % response.getheader("Content-Type"))
        try:
            return decode_batch(payload)
        except FramingError as exc:
            raise TunnelError(str(exc)) from None

    def abort(self):
        """From another thread: wake a blocked request so its thread can stop."""
        conn = self.conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _Connect:
    """http.client connections whose connect (and TLS handshake) has its own, shorter, deadline."""

    def connect(self):
        timeout, self.timeout = self.timeout, min(self.timeout, CONNECT_TIMEOUT)
        try:
            super().connect()
        finally:
            self.timeout = timeout
        self.sock.settimeout(timeout)


class _HTTPConnection(_Connect, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Connect, http.client.HTTPSConnection):
    pass


class HttpTransport(Transport):
    name = "http"

    def __init__(self, relay):
        super().__init__(relay)
        parts = urlsplit(relay.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/") + PATH
        self.queue = collections.deque()
        self.queued = 0  # bytes in queue
        self.bulk = False  # the last batch sent held BULK_BYTES or more
        self.queue_changed = threading.Condition()
        self.channels = []
        self._last_route = 0.0
        self.ready = False

    def workers(self):
        workers = [(self._receiver, "relay-http-receiver")]
        workers += [(self._sender, "relay-http-sender-%d" % i) for i in range(self.relay.http_senders)]
        return workers

    def connection(self, timeout):
        if self.https:
            return _HTTPSConnection(self.host, self.port, timeout=timeout, context=self.relay.ssl_context)
        return _HTTPConnection(self.host, self.port, timeout=timeout)

    def send(self, batch):
        self._put(batch)

    def _put(self, batch):
        with self.queue_changed:
            self.queue.extend(batch)
            self.queued += sum(map(len, batch))
            excess = len(self.queue) - QUEUE_LIMIT
            # The oldest are the stalest; WireGuard copes with loss.
            for _ in range(max(0, excess)):
                self.queued -= len(self.queue.popleft())
            self.relay.stats.drop(max(0, excess))
            self.queue_changed.notify()

    def _take(self):
        """Wait for at least one datagram (in bulk, for FILL_BYTES or FILL_WAIT), then take up to
        MAX_BATCH_BYTES of them."""
        with self.queue_changed:
            filled_by = None
            while True:
                if self.stopping.is_set():
                    return []
                # Another sender may have emptied the queue while this one waited to fill.
                if not self.queue:
                    filled_by = None
                    self.queue_changed.wait(0.5)
                    continue
                if not self.bulk or self.queued >= FILL_BYTES:
                    break
                now = time.monotonic()
                filled_by = filled_by or now + FILL_WAIT
                if now >= filled_by:
                    break
                self.queue_changed.wait(filled_by - now)
            batch = [self.queue.popleft()]
            size = record_size(batch[0])
            while self.queue and size + record_size(self.queue[0]) <= MAX_BATCH_BYTES:
                size += record_size(self.queue[0])
                batch.append(self.queue.popleft())
            self.queued -= sum(map(len, batch))
            self.bulk = size >= BULK_BYTES
            return batch

    def _deliver(self, answer):
        good = [d for d in answer if is_wireguard(d)]
        if len(good) < len(answer):
            self.relay.stats.drop(len(answer) - len(good))
        if good:
            self.relay.deliver(good, self)

    def _receiver(self):
        self._loop(PARKED_TIMEOUT, self._receive_once)

    def _receive_once(self, channel):
        # The first request on a new connection does not wait: it opens the
        # session and proves the token at once, instead of after a full hold.
        wait = "0" if channel.conn is None else None
        answer = channel.post(b"", wait=wait)
        self.live.answered(time.monotonic())
        self._deliver(answer)
        if answer and self.bulk:
            self.stopping.wait(PARK_PAUSE)

    def _sender(self):
        self._loop(SEND_TIMEOUT, self._send_once)

    def _send_once(self, channel):
        batch = self._take()
        if not batch:
            return
        started = time.monotonic()
        self.live.sent(started)
        try:
            answer = channel.post(encode_batch(batch), wait="0")
        except BaseException:
            self.relay.stats.drop(len(batch))
            raise
        now = time.monotonic()
        self.live.answered(now)
        self.live.sample(now - started)
        self.relay.stats.up(len(batch), sum(map(len, batch)), self.name)
        self._deliver(answer)

    def _loop(self, timeout, step):
        """Run step until stop; on an error close the connection, back off, retry."""
        relay = self.relay
        channel = _Channel(self, timeout)
        self.channels.append(channel)
        backoff = relay.backoff()
        try:
            while not self.stopping.is_set():
                try:
                    step(channel)
                except (OSError, http.client.HTTPException, TunnelError) as exc:
                    channel.close()
                    if self.stopping.is_set():
                        return
                    self.ready = False
                    self.failures += 1
                    relay.stats.reconnect()
                    log.warning("%s: POST %s failed: %s; retrying",
                                threading.current_thread().name, self.path, exc)
                    backoff.wait(self.stopping)
                    continue
                backoff.reset()
                self.failures = 0
                self.ready = True
        finally:
            channel.close()

    def tick(self, now):
        if self.live.dead(now):
            return "no answer over http for %.1f s" % self.live.silent_for(now)
        if now - self._last_route >= route.CHECK_EVERY:
            self._last_route = now
            for channel in list(self.channels):
                sock = channel.conn.sock if channel.conn is not None else None
                reason = route.moved(sock) if sock is not None else None
                if reason:
                    return reason
        return None

    def kick(self, reason):
        """Every connection dropped; each thread makes a new one."""
        self.live.reset()
        for channel in list(self.channels):
            channel.abort()

    def close(self):
        super().close()
        with self.queue_changed:
            self.queue_changed.notify_all()
        for channel in list(self.channels):
            channel.abort()
