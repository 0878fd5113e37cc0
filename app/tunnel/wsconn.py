"""The WebSocket connection behind /wireguard/ws: one greenlet per session.

simple-websocket (what flask-sock runs on) does the handshake; then
``detach()`` takes the connection out of the request (app/tunnel/routes.py runs it
in a greenlet of its own and the request ends), and ``serve()`` relays
between the client and the session's UDP socket with one selector over
both sockets:

- No reader thread and no inbox.  Each message from the client goes to
  WireGuard as soon as it is parsed, so a session holds at most one
  partial message (MAX_DATAGRAM, or MAX_BATCH_MESSAGE in batch mode) and
  one socket read (RECEIVE_BYTES) of the client's data.
- Towards the client, a readable UDP socket is drained (up to DRAIN
  datagrams) and the frames go out in one write.  What the kernel does not
  take waits in our own buffer; above HIGH_WATER bytes the session stops
  reading WireGuard, whose datagrams then drop in the kernel as UDP would.
  One writer, so frames never interleave.
- ``orbmesh.batch.v1`` (docs/tunnel-protocol.md): a client that offers it
  gets several datagrams per message, framed as HTTP batch bodies; anyone
  else gets one datagram per binary message.  No extension is ever
  negotiated (no permessage-deflate).

Closing rules: text message 1003, a message over the limit 1009, a broken
batch 1007, idle 1000 (no WireGuard datagram forwarded either way; dropped
junk does not count).  Liveness: any bytes from the client count; a ping's
deadline (one ping interval) starts only once the ping has left our send
buffers (our own and the kernel's, SIOCOUTQ), so a client busy reading a
long queue of frames ahead of the ping is not taken for dead; no pong and
no other frame by then closes with 1008.  A client whose socket takes
nothing for two ping intervals has stopped reading: it is dropped.
"""
import copy
import fcntl
import selectors
import socket
import struct
import termios
import time

import simple_websocket
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, Request,
                            TextMessage)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from orbmesh_relay.framing import (BATCH_PROTOCOL, MAX_BATCH_MESSAGE, MAX_DATAGRAM, FramingError, decode_batch,
                                   pack_batches)

UNSUPPORTED_DATA = CloseReason.UNSUPPORTED_DATA  # 1003
INVALID_DATA = CloseReason.INVALID_FRAME_PAYLOAD_DATA  # 1007
MESSAGE_TOO_BIG = CloseReason.MESSAGE_TOO_BIG  # 1009
POLICY_VIOLATION = CloseReason.POLICY_VIOLATION  # 1008

RECEIVE_BYTES = 65536
HIGH_WATER = 256 * 1024
DRAIN = 64
POLL = 0.05  # how often an unsent ping or a blocked write is looked at again
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class _NoThread:
    """simple-websocket starts a reader thread per connection; serve() reads in the request's greenlet."""

    def __init__(self, target=None):
        self.name = "tunnel"

    def start(self):
        pass

    def join(self, timeout=None):
        pass


class _NoEvent:
    """The base class makes an Event per connection that nothing here waits on."""

    def set(self):
        pass


def frame(payload):
    """A final, unmasked binary frame (server to client)."""
    size = len(payload)
    if size < 126:
        return bytes((0x82, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x82, 126, size) + payload
    return struct.pack("!BBQ", 0x82, 127, size) + payload


def unsent_bytes(sock):
    """Bytes the kernel holds for this socket that the peer has not taken (TIOCOUTQ/SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class TunnelWebSocket(simple_websocket.Server):
    """A server-side WebSocket that relays to a UDP pipe in one greenlet (serve())."""

    def __init__(self, environ, ping_interval=None, max_message_size=MAX_DATAGRAM, **_ignored):
        self.close_sent = None
        self.batch = False
        self.stall_timeout = 2 * ping_interval if ping_interval else 60.0
        self._out = bytearray()
        self._queued = 0  # bytes ever put in _out
        self._written = 0  # bytes ever handed to the kernel
        self._ping_end = None  # _queued just after the outstanding ping
        self._ping_left = None  # when that ping had left every send buffer
        self._handshake_headers = list(environ.get("orbmesh.handshake_headers") or [])
        super().__init__(environ, subprotocols=[BATCH_PROTOCOL], receive_bytes=RECEIVE_BYTES,
                         ping_interval=ping_interval, max_message_size=max_message_size,
                         thread_class=_NoThread, event_class=_NoEvent)
        # Past the handshake only the frame layer is used: drop the HTTP
        # parser, the request, the WSGI environ and their buffers (a few kB
        # a session, held for hours).
        self.ws = self.ws.connection
        del self.environ
        self._handshake_headers = self.subprotocols = self.thread = self.event = None
        now = time.monotonic()
        self.last_heard = self.last_datagram = self.last_progress = now

    def detach(self):
        """A copy of this connection that outlives the request, on a duplicate of its socket.

        An idle session held in the request's greenlet keeps gunicorn's and
        Flask's request objects and a deep saved stack alive (about 12 kB of
        the 28 kB an idle session cost; docs/benchmarks.md).  gunicorn
        closes its own descriptor when the request ends; the duplicate keeps
        the TCP connection.  This object is left closed, so flask-sock's
        close() after the view does nothing.
        """
        session = copy.copy(self)
        session.sock = self.sock.dup()
        self.connected = False
        return session

    # writing

    def _queue(self, data):
        self._out += data
        self._queued += len(data)

    def _flush(self):
        """Write what the kernel takes now; OSError means the client is gone."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                return
            if not sent:
                return
            del self._out[:sent]
            self._written += sent
            self.last_progress = time.monotonic()

    def _send_event(self, event):
        try:
            self._queue(self.ws.send(event))
        except LocalProtocolError:
            pass

    def close(self, reason=None, message=None):
        if not self.connected:
            raise simple_websocket.ConnectionClosed(self.close_reason, self.close_message)
        self._close(reason or CloseReason.NORMAL_CLOSURE, message)

    def _close(self, code, message=None):
        """Send a close frame, giving the client a moment to take it, and stop."""
        self.connected = False
        self.close_sent = int(code)
        self._send_event(CloseConnection(code, message))
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(self._out)
        except OSError:
            pass
        self._out = bytearray()

    # the handshake (the base class runs it from __init__, socket still blocking)

    def _handle_events(self):
        for event in self.ws.events():
            if isinstance(event, Request):
                self.batch = BATCH_PROTOCOL in event.subprotocols
                if self.batch:
                    self.max_message_size = MAX_BATCH_MESSAGE
                self.subprotocol = BATCH_PROTOCOL if self.batch else None
                extra = [(k.encode(), v.encode()) for k, v in self._handshake_headers]
                self.sock.sendall(self.ws.send(AcceptConnection(subprotocol=self.subprotocol, extensions=[],
                                                                extra_headers=extra)))
        return True

    # relaying

    def serve(self, pipe, idle_timeout):
        """Relay between the client and `pipe` until either side ends; returns why it ended."""
        self.sock.setblocking(False)
        try:
            # Writes are already coalesced here; Nagle would only hold a
            # lone small frame back until the client's delayed ACK.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket behind a proxy)
        selector = selectors.DefaultSelector()
        selector.register(self.sock, _READ)
        reading_udp, writing = False, False
        next_ping = time.monotonic() + self.ping_interval if self.ping_interval else None
        reason = "client closed"
        try:
            while self.connected:
                # The pipe's socket exists once the client has sent something (lazy).
                if reading_udp != (pipe.sock is not None and len(self._out) < HIGH_WATER):
                    reading_udp = not reading_udp
                    if reading_udp:
                        selector.register(pipe.sock, _READ)
                    else:
                        selector.unregister(pipe.sock)
                if writing != bool(self._out):
                    writing = not writing
                    selector.modify(self.sock, _READ | (_WRITE if writing else 0))
                now = time.monotonic()
                for key, mask in selector.select(self._timeout(now, next_ping, idle_timeout)):
                    if key.fileobj is pipe.sock:
                        self._from_wireguard(pipe)
                    else:
                        if mask & _WRITE:
                            self._flush()
                        if mask & _READ and not self._from_client(pipe):
                            break
                if self.connected:
                    reason, next_ping = self._timers(time.monotonic(), next_ping, idle_timeout)
        except OSError:
            self.connected = False
            reason = "connection lost"
        finally:
            selector.close()
            if self.connected:
                self.connected = False
            self.sock.close()
        if self.close_sent and reason == "client closed":
            reason = "closed with %d" % self.close_sent
        return reason

    def _timeout(self, now, next_ping, idle_timeout):
        deadlines = [self.last_datagram + idle_timeout]
        if self._out:
            deadlines.append(min(now + POLL, self.last_progress + self.stall_timeout))
        if self._ping_end is not None:
            if self._ping_left is None:
                deadlines.append(now + POLL)
            else:
                deadlines.append(max(self._ping_left, self.last_heard) + self.ping_interval)
        elif next_ping is not None:
            deadlines.append(next_ping)
        return max(0.0, min(deadlines) - now)

    def _timers(self, now, next_ping, idle_timeout):
        """Ping, pong deadline, stalled writes, idleness; returns (reason if closed, next_ping)."""
        if self._out and now - self.last_progress > self.stall_timeout:
            self.connected = False
            return "stalled", next_ping
        if now - self.last_datagram > idle_timeout:
            self._close(CloseReason.NORMAL_CLOSURE, "idle")
            return "idle", next_ping
        if self._ping_end is not None:
            if self._ping_left is None and self._written - unsent_bytes(self.sock) >= self._ping_end:
                self._ping_left = now
            if self._ping_left is not None and now - max(self._ping_left, self.last_heard) > self.ping_interval:
                self._close(POLICY_VIOLATION, "ping timeout")
                return "closed with %d" % POLICY_VIOLATION, next_ping
        elif next_ping is not None and now >= next_ping:
            self._send_event(Ping())
            self._ping_end, self._ping_left = self._queued, None
            self._flush()
            next_ping = now + self.ping_interval
        return "client closed", next_ping

    def _from_wireguard(self, pipe):
        datagrams = pipe.drain(DRAIN)
        if not datagrams:
            return
        self.last_datagram = time.monotonic()
        if self.batch:
            self._queue(b"".join(frame(body) for body in pack_batches(datagrams)))
        else:
            self._queue(b"".join(frame(datagram) for datagram in datagrams))
        self._flush()

    def _from_client(self, pipe):
        """Read and act on what the client sent; False once the connection is over."""
        try:
            data = self.sock.recv(self.receive_bytes)
        except BlockingIOError:
            return True
        if not data:
            self.connected = False
            return False
        self.last_heard = time.monotonic()
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                if not self._collect(event, pipe):
                    return False
            elif isinstance(event, Ping):
                self._send_event(event.response())
            elif isinstance(event, Pong):
                self._ping_end = self._ping_left = None
            elif isinstance(event, CloseConnection):
                self.close_reason, self.close_message = event.code, event.reason
                self._send_event(event.response())
                self._flush()
                self.connected = False
                return False
            elif isinstance(event, TextMessage):
                self._close(UNSUPPORTED_DATA, "binary messages only")
                return False
        self._flush()
        return True

    def _collect(self, event, pipe):
        """Assemble a message from its frames and pass it on; False if it closed the connection."""
        self.incoming_message_len += len(event.data)
        if self.incoming_message_len > self.max_message_size:
            self._close(MESSAGE_TOO_BIG, "message too big")
            return False
        if self.incoming_message is None:
            self.incoming_message = bytearray(event.data) if not event.message_finished else event.data
        else:
            self.incoming_message += event.data
        if not event.message_finished:
            return True
        message = bytes(self.incoming_message)
        self.incoming_message = None
        self.incoming_message_len = 0
        if self.batch:
            try:
                datagrams = decode_batch(message)
            except FramingError:
                self._close(INVALID_DATA, "broken batch")
                return False
        else:
            datagrams = [message]
        # Only datagrams that went on to WireGuard reset the idle timer: junk
        # the pipe drops (or an empty batch) would otherwise hold the session
        # and its slot open for as long as a client cared to send it.
        if pipe.send(datagrams):
            self.last_datagram = time.monotonic()
        return True

