"""JSON over HTTP(S) with one deadline for the whole call: the exits' API and OrbNET's registry.

urllib's timeout is per socket operation, so a server that answers one byte
every half second holds a call for as long as it likes.  Here each address
gets only the time that is left to connect, and a timer shuts the connection
down when the call's time is up, whatever it is doing then (TLS handshake,
sending, reading): the blocked read returns and the call fails.  The timer
shuts down a duplicate of the socket's descriptor, which reaches the same
connection after TLS has taken the original over.

Redirects are never followed (http.client does not): one would carry
X-API-Key to another host.
"""
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse

MAX_BYTES = 4 * 1024 * 1024


def tls_context(ca_file=""):
    """Certificates checked against `ca_file` (PEM), or the system's when empty."""
    return ssl.create_default_context(cafile=ca_file or None)


class _Deadline:
    def __init__(self, seconds):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.passed = False
        self._duplicates = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._shut_down)
        self._timer.daemon = True
        self._timer.start()

    def connect(self, address, timeout=None, source_address=None):
        """socket.create_connection, each attempt bounded by the time left; the socket is watched."""
        error = OSError("no address to connect to")
        for family, kind, proto, _, target in socket.getaddrinfo(*address, type=socket.SOCK_STREAM):
            left = self.at - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(target)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            with self._lock:
                self._duplicates.append(sock.dup())
                late = self.passed
            if late:
                self._shut_down()
            return sock
        raise error

    def _shut_down(self):
        with self._lock:
            self.passed = True
            for duplicate in self._duplicates:
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._timer.cancel()
        with self._lock:
            for duplicate in self._duplicates:
                duplicate.close()
            self._duplicates = []


def request(method, url, timeout, body=None, api_key=None, context=None):
    """(status, decoded JSON or None) within `timeout` seconds in all; OSError when nothing usable came back."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError("not an http(s) URL")
    try:
        port = parts.port
    except ValueError:
        raise OSError("bad port in the URL") from None
    headers = {"Accept": "application/json", "Connection": "close"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["X-API-Key"] = api_key
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context or tls_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    deadline = _Deadline(timeout)
    conn._create_connection = deadline.connect
    try:
        conn.request(method, (parts.path or "/") + ("?" + parts.query if parts.query else ""), data, headers)
        response = conn.getresponse()
        status, raw = response.status, response.read(MAX_BYTES + 1)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.passed:
            raise OSError("no complete answer within %g s" % timeout) from None
        raise OSError(str(exc) or exc.__class__.__name__) from None
    finally:
        deadline.close()
        conn.close()
    if deadline.passed:  # the answer was cut short at the deadline
        raise OSError("no complete answer within %g s" % timeout)
    if len(raw) > MAX_BYTES:
        raise OSError("response too large")
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None
