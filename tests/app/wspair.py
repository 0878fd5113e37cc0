"""A TunnelWebSocket and a wsproto client joined by loopback TCP, for unit tests."""
import socket

from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from app.wsconn import TunnelWebSocket


def pair(ping_interval=None, server_class=TunnelWebSocket, environ_extra=None, **kwargs):
    """A TunnelWebSocket on one end of a loopback TCP connection, a wsproto client on the other."""
    # TCP on loopback, not a socketpair: TCP is where a send() writes only
    # part of a buffer, which is the hazard under test.
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    client = WSConnection(ConnectionType.CLIENT)
    # The server reads the request from environ, as under gunicorn; the
    # client's bytes only give us its key.
    request = client.send(Request(host="test", target="/wireguard/ws")).decode()
    key = next(line.split(":", 1)[1].strip() for line in request.split("\r\n")
               if line.lower().startswith("sec-websocket-key:"))
    environ = {"werkzeug.socket": server_sock, "HTTP_HOST": "test", "HTTP_UPGRADE": "websocket",
               "HTTP_CONNECTION": "Upgrade", "HTTP_SEC_WEBSOCKET_VERSION": "13",
               "HTTP_SEC_WEBSOCKET_KEY": key,
               "HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate; client_max_window_bits"}
    environ.update(environ_extra or {})
    server = server_class(environ, ping_interval=ping_interval, **kwargs)
    return server, client, client_sock
