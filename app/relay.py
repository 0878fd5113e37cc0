"""Client relay: carries a local WireGuard client's UDP over the server's tunnel.

    orbmesh-wg relay --transport ws|http --url https://HOST:PORT --token TOKEN \\
                     --listen 127.0.0.1:PORT [--status-interval SECONDS] \\
                     [--insecure | --ca-file PEM] [--http-senders N] [--session NAME]

The relay binds a UDP socket at --listen; the WireGuard client's Endpoint
points at it.  Datagrams from WireGuard go to the server (docs/tunnel-protocol.md);
datagrams from the server go to the address the last local datagram came from.
The transports live in relay_ws.py and relay_http.py; this module holds what
they share, the options and the main loop.

Status line, printed to stdout every --status-interval seconds (0 = never),
on SIGUSR1 and once more when the relay stops; its format is stable::

    relay TRANSPORT up=PKTS/BYTES down=PKTS/BYTES dropped=N reconnects=N connected=yes|no

TRANSPORT is ``ws`` or ``http``.  ``up`` counts datagrams (and their bytes)
handed to the server, ``down`` those delivered to local WireGuard.
``dropped`` counts datagrams lost on the way in either direction (no
connection, full queue, failed request, no local address yet).
``reconnects`` counts retries after a lost connection or a failed attempt
(in HTTP mode each request thread retries, and counts, on its own).
``connected`` is whether the last attempt or request succeeded.

Exit status: 0 on SIGTERM/SIGINT, 2 when the server refuses the token (401)
or the options are unusable.
"""
import argparse
import logging
import os
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

TOKEN_ENV = "ORBMESH_RELAY_TOKEN"
MAX_DATAGRAM = 65535
POLL_SECONDS = 0.5  # how long a blocking read may delay noticing a stop
SESSION_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")


class Unauthorized(Exception):
    """The server refused the token: retrying cannot help."""


class Stats:
    """Counters shared by every thread of one relay."""

    def __init__(self):
        self._lock = threading.Lock()
        self.up_packets = self.up_bytes = 0
        self.down_packets = self.down_bytes = 0
        self.dropped = 0
        self.reconnects = 0
        self.connected = False

    def up(self, packets, nbytes):
        with self._lock:
            self.up_packets += packets
            self.up_bytes += nbytes

    def down(self, packets, nbytes):
        with self._lock:
            self.down_packets += packets
            self.down_bytes += nbytes

    def drop(self, count=1):
        with self._lock:
            self.dropped += count

    def reconnect(self):
        with self._lock:
            self.reconnects += 1

    def set_connected(self, value):
        self.connected = bool(value)

    def line(self, transport):
        with self._lock:
            return "relay %s up=%d/%d down=%d/%d dropped=%d reconnects=%d connected=%s" % (
                transport, self.up_packets, self.up_bytes, self.down_packets, self.down_bytes,
                self.dropped, self.reconnects, "yes" if self.connected else "no")


class Backoff:
    """0.5 s doubling to 30 s, each delay jittered by +-25 % so that many
    relays cut off by the same server restart do not come back in lockstep."""

    def __init__(self, first=0.5, cap=30.0):
        self.first = first
        self.cap = cap
        self._next = first

    def reset(self):
        self._next = self.first

    def next_delay(self):
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.75, 1.25)

    def wait(self, stopping):
        """Sleep one step; True if the relay is stopping meanwhile."""
        return stopping.wait(self.next_delay())


class LocalPort:
    """The UDP socket local WireGuard talks to."""

    def __init__(self, host, port):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(POLL_SECONDS)
        self.peer = None

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    def receive(self):
        """One datagram from WireGuard, or None after POLL_SECONDS."""
        try:
            data, peer = self.sock.recvfrom(MAX_DATAGRAM)
        except socket.timeout:
            return None
        self.peer = peer
        return data

    def send(self, datagram):
        peer = self.peer
        if peer is None:
            return False
        try:
            self.sock.sendto(datagram, peer)
        except OSError as exc:
            log.debug("local send failed: %s", exc)
            return False
        return True

    def close(self):
        self.sock.close()


class Relay:
    """One relay: a local port, a transport and its threads.

    Tests drive this directly; main() adds signals and the status printer.
    """

    def __init__(self, transport, url, token, listen, *, ssl_context=None, http_senders=2,
                 session=None, backoff_first=0.5):
        self.transport_name = transport
        self.url = url
        self.token = token
        self.ssl_context = ssl_context
        self.http_senders = http_senders
        self.session = session or "relay-" + os.urandom(8).hex()
        self.backoff_first = backoff_first
        self.stats = Stats()
        self.stopping = threading.Event()
        self.fatal = None
        self.local = LocalPort(*listen)
        self.transport = _transport_class(transport)(self)
        self._threads = []

    def start(self):
        for target, name in self.transport.workers():
            thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _guard(self, target):
        try:
            target()
        except Unauthorized as exc:
            self.fail(str(exc))
        except Exception:
            if not self.stopping.is_set():
                log.exception("relay thread %s died", threading.current_thread().name)
                self.fail("internal error in %s" % threading.current_thread().name)

    def backoff(self):
        return Backoff(first=self.backoff_first)

    def local_datagrams(self):
        """Datagrams from local WireGuard, until the relay stops.

        Empty datagrams are counted as dropped: neither transport can carry one.
        """
        while not self.stopping.is_set():
            try:
                data = self.local.receive()
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            if data is None:
                continue
            if not data:
                self.stats.drop()
                continue
            yield data

    def deliver(self, datagram):
        """A datagram from the server, to local WireGuard."""
        if self.local.send(datagram):
            self.stats.down(1, len(datagram))
        else:
            self.stats.drop()

    def fail(self, message):
        if self.fatal is None:
            self.fatal = message
        self.stopping.set()

    def status_line(self):
        return self.stats.line(self.transport_name)

    def stop(self, timeout=5.0):
        self.stopping.set()
        self.transport.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.local.close()
        self.stats.set_connected(False)


def _transport_class(name):
    # Imported here: the transport modules import this one.
    if name == "ws":
        from .relay_ws import WsTransport
        return WsTransport
    if name == "http":
        from .relay_http import HttpTransport
        return HttpTransport
    raise ValueError("unknown transport %r" % name)


def unauthorized_message():
    return "the server refused the token (401); check --token or %s" % TOKEN_ENV


def base_url(text):
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--url must be http://HOST[:PORT] or https://HOST[:PORT]")
    if parts.query or parts.fragment:
        raise ValueError("--url takes no query or fragment")
    parts.port  # raises ValueError on a bad port
    return text


def parse_listen(text):
    """'127.0.0.1:PORT' or '[::1]:PORT' -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", text)
    if not match:
        raise ValueError("--listen must be IPV4:PORT or [IPV6]:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError("--listen port out of range")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise ValueError("--listen has a bad address %r" % host) from None
    return host, port


def tls_context(insecure=False, ca_file=None):
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file)


def _arg(parse):
    # argparse shows an ArgumentTypeError's own message; a plain ValueError
    # would become a bare "invalid value".
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _session(text):
    if not SESSION_RE.match(text):
        raise ValueError("--session must match [A-Za-z0-9_-]{1,64}")
    return text


def _senders(text):
    value = int(text)
    if not 1 <= value <= 64:
        raise ValueError("--http-senders must be 1 to 64")
    return value


def _interval(text):
    value = float(text)
    if value < 0:
        raise ValueError("--status-interval must be >= 0")
    return value


def add_arguments(parser):
    parser.add_argument("--transport", choices=("ws", "http"), required=True)
    parser.add_argument("--url", type=_arg(base_url), required=True,
                        help="server base URL, http(s)://HOST:PORT")
    parser.add_argument("--token", help="device token; default: the %s environment variable "
                                        "(keeps it out of the process list)" % TOKEN_ENV)
    parser.add_argument("--listen", type=_arg(parse_listen), required=True,
                        help="local UDP address for WireGuard's Endpoint, IPV4:PORT or [IPV6]:PORT")
    parser.add_argument("--status-interval", type=_arg(_interval), default=60.0, metavar="SECONDS",
                        help="print a status line this often (default 60; 0 = only on SIGUSR1)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    tls.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify the server with")
    parser.add_argument("--http-senders", type=_arg(_senders), default=2, metavar="N",
                        help="HTTP mode: sending requests in flight (default 2)")
    parser.add_argument("--session", type=_arg(_session),
                        help="HTTP mode: X-Tunnel-Session name (default: random per process)")


def main(args):
    """Run until SIGTERM/SIGINT (0) or a refused token (2)."""
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print("orbmesh-wg relay: no token: pass --token or set %s" % TOKEN_ENV, file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.insecure:
        print("orbmesh-wg relay: WARNING: --insecure: the server's certificate is not verified",
              file=sys.stderr, flush=True)
    context = None
    if urlsplit(args.url).scheme == "https":
        context = tls_context(args.insecure, args.ca_file)
    relay = Relay(args.transport, args.url, token, args.listen, ssl_context=context,
                  http_senders=args.http_senders, session=args.session)
    log.info("listening on udp %s port %d, relaying to %s over %s",
             *relay.local.address, args.url, args.transport)

    # Handlers only set flags: the main thread acts on them between sleeps,
    # so nothing that takes a lock ever runs inside a signal handler.
    flags = {"stop": False, "status": False}

    def on_stop(signum, frame):
        flags["stop"] = True

    def on_status(signum, frame):
        flags["status"] = True

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGUSR1, on_status))}
    try:
        relay.start()
        interval = args.status_interval
        due = time.monotonic() + interval
        while not flags["stop"] and not relay.stopping.is_set():
            if flags["status"] or (interval and time.monotonic() >= due):
                flags["status"] = False
                if interval and time.monotonic() >= due:
                    due = time.monotonic() + interval
                print(relay.status_line(), flush=True)
            time.sleep(0.1)
        relay.stop()
        print(relay.status_line(), flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if relay.fatal:
        print("orbmesh-wg relay: %s" % relay.fatal, file=sys.stderr, flush=True)
        return 2
    return 0
