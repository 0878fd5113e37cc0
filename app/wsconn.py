"""The WebSocket connection behind /wireguard/ws: simple-websocket, made safe.

simple-websocket 1.1.0 (what flask-sock runs on) has three habits a tunnel
cannot live with, so this subclass replaces the methods that have them:

- ``send()`` makes one ``socket.send()`` call, which may write only part of
  a frame under load; and ping replies and pings are written from its
  reader thread at the same time.  Here every write is ``sendall`` under
  one lock, so frames are complete and never interleave.
- It accepts permessage-deflate whenever a client offers it.  Here no
  extension is ever negotiated.
- Its input buffer is an unbounded list.  Here it is a bounded queue that
  drops its oldest datagram (and counts it) when the consumer falls behind;
  losing a datagram is what UDP would have done anyway.

It also closes text messages with 1003 and messages over the size limit
with 1009, closes with 1008 when a ping goes unanswered, and gives up on a
client whose socket accepts nothing for two ping intervals.
"""
import collections
import selectors
import threading
import time

import flask_sock
import simple_websocket
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Pong, Request,
                            TextMessage)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from orbmesh_relay.framing import MAX_DATAGRAM


UNSUPPORTED_DATA = CloseReason.UNSUPPORTED_DATA  # 1003
MESSAGE_TOO_BIG = CloseReason.MESSAGE_TOO_BIG  # 1009
POLICY_VIOLATION = CloseReason.POLICY_VIOLATION  # 1008


class TunnelWebSocket(simple_websocket.Server):
    """A server-side WebSocket whose writes are complete and serialised."""

    def __init__(self, environ, ping_interval=None, max_message_size=MAX_DATAGRAM, inbox_size=512,
                 receive_bytes=65536, **_ignored):
        # Set before the base class runs the handshake, which already writes.
        self._write_lock = threading.Lock()
        self._inbox = collections.deque()
        self._inbox_size = inbox_size
        self.inbox_dropped = 0
        self.close_sent = None
        self._handshake_headers = list(environ.get("orbmesh.handshake_headers") or [])
        super().__init__(environ, receive_bytes=receive_bytes, ping_interval=ping_interval,
                         max_message_size=max_message_size)
        # A write that cannot finish in two ping intervals means the client
        # stopped reading or vanished: give up on it rather than hold the
        # write lock (and with it, our pings) forever.
        self.sock.settimeout(2 * ping_interval if ping_interval else 60.0)

    # writing

    def _write(self, event):
        """Serialise one event and write all of it; the lock covers wsproto's state too."""
        with self._write_lock:
            data = self.ws.send(event)
            if data:
                self.sock.sendall(data)

    def send(self, data):
        if not self.connected:
            raise simple_websocket.ConnectionClosed(self.close_reason, self.close_message)
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                self._write(Message(data=bytes(data)))
            else:
                self._write(TextMessage(data=str(data)))
        except (OSError, LocalProtocolError):
            self.connected = False
            self.event.set()
            raise simple_websocket.ConnectionClosed(self.close_reason, self.close_message) from None

    def close(self, reason=None, message=None):
        if not self.connected:
            raise simple_websocket.ConnectionClosed(self.close_reason, self.close_message)
        self._close(reason or CloseReason.NORMAL_CLOSURE, message)

    def _close(self, code, message=None):
        self.connected = False
        self.close_sent = int(code)
        try:
            self._write(CloseConnection(code, message))
        except (OSError, LocalProtocolError):
            pass
        self.event.set()

    # reading

    def receive(self, timeout=None):
        """The next datagram, None on timeout; ConnectionClosed once closed and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            if not self.connected:
                raise simple_websocket.ConnectionClosed(self.close_reason, self.close_message)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self.event.wait(remaining)
            self.event.clear()
        return self._inbox.popleft()

    def _deliver(self, data):
        if len(self._inbox) >= self._inbox_size:
            self._inbox.popleft()
            self.inbox_dropped += 1
        self._inbox.append(data)
        self.event.set()

    def _thread(self):
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        next_ping = time.monotonic() + self.ping_interval if self.ping_interval else None
        try:
            while self.connected:
                timeout = None if next_ping is None else max(0.0, next_ping - time.monotonic())
                if not selector.select(timeout):
                    if not self.pong_received:
                        self._close(POLICY_VIOLATION, "ping timeout")
                        break
                    self.pong_received = False
                    self._write(Ping())
                    next_ping += self.ping_interval
                    continue
                data = self.sock.recv(self.receive_bytes)
                if not data:
                    break
                self.ws.receive_data(data)
                self.connected = self._handle_events()
        except (OSError, LocalProtocolError):
            pass
        finally:
            self.connected = False
            self.event.set()
            selector.close()
            self.sock.close()

    def _handle_events(self):
        for event in self.ws.events():
            if isinstance(event, Request):
                # No extensions: permessage-deflate is never negotiated.
                self._write(AcceptConnection(subprotocol=None, extensions=[],
                                             extra_headers=[(k.encode(), v.encode())
                                                            for k, v in self._handshake_headers]))
            elif isinstance(event, CloseConnection):
                self.close_reason, self.close_message = event.code, event.reason
                try:
                    self._write(event.response())
                except (OSError, LocalProtocolError):
                    pass
                self.event.set()
                return False
            elif isinstance(event, Ping):
                self._write(event.response())
            elif isinstance(event, Pong):
                self.pong_received = True
            elif isinstance(event, TextMessage):
                self._close(UNSUPPORTED_DATA, "binary messages only")
                return False
            elif isinstance(event, BytesMessage):
                if not self._collect(event):
                    self._close(MESSAGE_TOO_BIG, "message too big")
                    return False
        return True

    def _collect(self, event):
        """Assemble a message from its frames; False once it passes the size limit."""
        self.incoming_message_len += len(event.data)
        if self.incoming_message_len > self.max_message_size:
            return False
        if self.incoming_message is None:
            self.incoming_message = bytearray(event.data) if not event.message_finished else event.data
        else:
            self.incoming_message += event.data
        if event.message_finished:
            self._deliver(bytes(self.incoming_message))
            self.incoming_message = None
            self.incoming_message_len = 0
        return True


def init_app(app):
    """Make flask-sock build TunnelWebSocket connections.

    flask-sock 0.7 creates each connection with the name ``Server`` from its
    own module and has no option to choose the class; pointing that name at
    our subclass is the one seam it has.  The check makes an upgrade that
    changes this fail at start, not in production traffic.
    """
    if flask_sock.Server not in (simple_websocket.Server, TunnelWebSocket):
        raise RuntimeError("unexpected flask_sock.Server; re-check app/wsconn.py against flask-sock")
    flask_sock.Server = TunnelWebSocket
