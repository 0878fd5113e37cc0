"""WebSocket transport of the client relay: GET /wireguard/ws
(docs/tunnel-protocol.md).  It offers the ``orbmesh.batch.v1`` subprotocol:
where the server takes it, each binary message carries every datagram that
was waiting (batch framing, both ways); where it does not, one datagram per
message, as any WebSocket client would.

Given the Relay it serves, it uses the relay's attributes (url, token,
stats, stopping, local_batches, deliver) and never imports relay.py.

Two threads: "up" reads local UDP and sends; "down" owns the connection,
(re)connects with backoff and delivers what it receives.
"""
import logging
import threading
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import connect

from .common import Unauthorized, unauthorized_message
from .framing import BATCH_PROTOCOL, MAX_BATCH_MESSAGE, FramingError, decode_batch, pack_batches

log = logging.getLogger(__name__)

PATH = "/wireguard/ws"


def ws_uri(url):
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + PATH, "", ""))


class WsTransport:
    def __init__(self, relay):
        self.relay = relay
        self.uri = ws_uri(relay.url)
        self._lock = threading.Lock()
        self._ws = None

    def workers(self):
        return [(self._uplink, "relay-ws-up"), (self._downlink, "relay-ws-down")]

    def _connect(self):
        return connect(
            self.uri,
            ssl=self.relay.ssl_context if self.uri.startswith("wss:") else None,
            additional_headers={"Authorization": "Bearer " + self.relay.token},
            user_agent_header="orbmesh-wg-relay",
            # The server never negotiates it; WireGuard data does not compress.
            compression=None,
            subprotocols=[BATCH_PROTOCOL],
            max_size=MAX_BATCH_MESSAGE,
            # Same reach as the HTTP transport, which uses no proxy either.
            proxy=None,
            open_timeout=10,
            close_timeout=2,
            # A plain connection object: its lifetime spans two threads and
            # close() comes from the stopping one, which a with-block cannot express.
            legacy=True,
        )

    def _uplink(self):
        relay = self.relay
        for batch in relay.local_batches():
            ws = self._ws
            if ws is None:
                # WireGuard retransmits its handshakes; queueing stale ones
                # for a connection that may take 30 s would only add delay.
                relay.stats.drop(len(batch))
                continue
            messages = pack_batches(batch) if ws.subprotocol == BATCH_PROTOCOL else batch
            try:
                for message in messages:
                    ws.send(message)
            except (ConnectionClosed, OSError) as exc:
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
                ws = self._connect()
            except InvalidStatus as exc:
                if exc.response.status_code == 401:
                    raise Unauthorized(unauthorized_message()) from None
                log.warning("websocket refused: HTTP %d; retrying", exc.response.status_code)
                continue
            except (OSError, TimeoutError, WebSocketException) as exc:
                log.warning("websocket connect to %s failed: %s; retrying", self.uri, exc)
                continue
            backoff.reset()
            with self._lock:
                if relay.stopping.is_set():
                    ws.close()
                    return
                self._ws = ws
            relay.stats.set_connected(True)
            log.info("websocket connected to %s", self.uri)
            try:
                self._receive(ws)
            finally:
                with self._lock:
                    self._ws = None
                relay.stats.set_connected(False)
                ws.close()

    def _receive(self, ws):
        relay = self.relay
        batched = ws.subprotocol == BATCH_PROTOCOL
        try:
            for message in ws:
                if isinstance(message, str) or not message:
                    relay.stats.drop()
                elif not batched:
                    relay.deliver([message])
                elif not self._deliver_batch(message):
                    relay.stats.drop()
            if not relay.stopping.is_set():
                log.warning("websocket closed (code %s); reconnecting", ws.close_code)
        except (ConnectionClosed, OSError) as exc:
            if not relay.stopping.is_set():
                log.warning("websocket lost: %s; reconnecting", exc)

    def _deliver_batch(self, message):
        try:
            datagrams = decode_batch(message)
        except FramingError:
            return False
        self.relay.deliver(datagrams)
        return True

    def close(self):
        with self._lock:
            ws = self._ws
        if ws is not None:
            ws.close()
