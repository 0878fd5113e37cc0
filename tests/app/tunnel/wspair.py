"""A TunnelWebSocket and a wsproto client joined by loopback TCP, for unit tests.

The session's "WireGuard" is the other end of a Unix datagram socketpair
(PairPipe): unlike UDP it never loses a datagram, and a test that writes
into it blocks when the session falls behind, so volumes are exact.
"""
import socket
import threading

from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from app.ops.metrics import tunnel_meter
from app.tunnel.sessions import Counters, UdpPipe
from app.tunnel.wsconn import TunnelWebSocket


class PairPipe(UdpPipe):
    """UdpPipe's own send/drain over a socketpair; `wireguard` is the far end."""

    gso = False  # a Unix socket ignores UDP_SEGMENT and would deliver the run as one datagram

    def __init__(self):
        self.sock, self.wireguard = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.target = None
        self.counters = Counters()
        self.meter = tunnel_meter("ws")

    def close(self):
        self.sock.close()
        self.wireguard.close()


def pair(ping_interval=None, server_class=TunnelWebSocket, environ_extra=None, subprotocols=(), **kwargs):
    """A TunnelWebSocket on one end of a loopback TCP connection, a wsproto client on the other."""
    # TCP on loopback, not a socketpair: TCP is where a send() writes only
    # part of a buffer.
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    client = WSConnection(ConnectionType.CLIENT)
    # The server reads the request from environ, as under gunicorn; the
    # client's bytes only give us its key.
    request = client.send(Request(host="test", target="/wireguard/ws", subprotocols=list(subprotocols))).decode()
    key = next(line.split(":", 1)[1].strip() for line in request.split("\r\n")
               if line.lower().startswith("sec-websocket-key:"))
    environ = {"werkzeug.socket": server_sock, "HTTP_HOST": "test", "HTTP_UPGRADE": "websocket",
               "HTTP_CONNECTION": "Upgrade", "HTTP_SEC_WEBSOCKET_VERSION": "13",
               "HTTP_SEC_WEBSOCKET_KEY": key,
               "HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate; client_max_window_bits"}
    if subprotocols:
        environ["HTTP_SEC_WEBSOCKET_PROTOCOL"] = ", ".join(subprotocols)
    environ.update(environ_extra or {})
    server = server_class(environ, ping_interval=ping_interval, **kwargs)
    return server, client, client_sock


class Session:
    """A pair plus a PairPipe, serve() running on a thread; `reason` is set when it ends."""

    def __init__(self, ping_interval=None, idle_timeout=300.0, subprotocols=(), **kwargs):
        self.server, self.client, self.sock = pair(ping_interval, subprotocols=subprotocols, **kwargs)
        self.pipe = PairPipe()
        self.reason = None
        self.thread = threading.Thread(target=self._serve, args=(idle_timeout,), daemon=True)
        self.thread.start()

    def _serve(self, idle_timeout):
        self.reason = self.server.serve(self.pipe, idle_timeout)

    def close(self):
        self.sock.close()
        self.thread.join(timeout=10)
        self.pipe.close()
