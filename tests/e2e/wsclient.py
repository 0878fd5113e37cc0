"""A bare WebSocket client on wsproto, for tests that must misbehave on purpose.

It sends exactly the frames a test asks for (text, oversize, garbage) and
answers pings only while `auto_pong` is on, so a test can play a half-open
client.
"""
import socket

from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, RejectConnection,
                            RejectData, Request, TextMessage)


class Rejected(Exception):
    def __init__(self, status, body, headers=()):
        super().__init__("upgrade refused with %d" % status)
        self.status = status
        self.body = body
        self.headers = {k.decode().lower(): v.decode() for k, v in headers}


class RawWebSocket:
    def __init__(self, sock, host, path="/wireguard/ws", headers=(), extensions=()):
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.auto_pong = True
        self.messages = []
        self.closed_with = None
        self.pings = 0
        self.sock.sendall(self.ws.send(Request(host=host, target=path, extra_headers=list(headers),
                                               extensions=list(extensions))))
        self.accepted = self._handshake()

    def _handshake(self):
        status, body, headers = None, b"", ()
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise Rejected(status or 0, body, headers)
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return event
                if isinstance(event, RejectConnection):
                    status, headers = event.status_code, event.headers
                    if not event.has_body:
                        raise Rejected(status, body, headers)
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Rejected(status, body, headers)

    def send_bytes(self, data):
        self.sock.sendall(self.ws.send(Message(data=data)))

    def send_text(self, text):
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def pump(self, timeout=1.0):
        """Read what has arrived; returns False once the connection is closed."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (socket.timeout, TimeoutError):
            return True
        except OSError:
            return False
        if not data:
            return False
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, Ping):
                self.pings += 1
                if self.auto_pong:
                    self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, BytesMessage):
                self.messages.append(event.data)
            elif isinstance(event, CloseConnection):
                self.closed_with = event.code
                return False
        return True

    def close(self):
        self.sock.close()
