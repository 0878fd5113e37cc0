"""What the relay and its transports share: the counters behind the status
line, the reconnect backoff, the UDP port local WireGuard talks to, and the
one error no retry can cure.

Kept apart from relay.py so that the transports can use it while relay.py
imports the transports: the modules form no circle.
"""
import logging
import random
import socket
import threading
import time

from .liveness import Liveness
from .udpio import Port

log = logging.getLogger(__name__)

TOKEN_ENV = "ORBMESH_RELAY_TOKEN"
POLL_SECONDS = 0.5  # how long a blocking read may delay noticing a stop
DRAIN = 64  # datagrams taken from local WireGuard per wake-up
UDP_BUFFER = 1 << 20  # room for bursts while a transport thread is busy


class Unauthorized(Exception):
    """The server refused the token (401) or the device (403): retrying cannot help."""


def unauthorized_message(status=401):
    if status == 403:
        return "the server refused this device (403); check the token's device and the server's limits"
    return "the server refused the token (401); check --token or %s" % TOKEN_ENV


class Stats:
    """Counters shared by every thread of one relay (the status line's
    format is documented in the package docstring), in all and per transport."""

    def __init__(self):
        self._lock = threading.Lock()
        self.up_packets = self.up_bytes = 0
        self.down_packets = self.down_bytes = 0
        self.dropped = 0
        self.reconnects = 0
        self.connected = False
        self.per_transport = {}  # name -> [up packets, up bytes, down packets, down bytes]

    def _of(self, transport):
        return self.per_transport.setdefault(transport, [0, 0, 0, 0])

    def up(self, packets, nbytes, transport=None):
        with self._lock:
            self.up_packets += packets
            self.up_bytes += nbytes
            if transport:
                counts = self._of(transport)
                counts[0] += packets
                counts[1] += nbytes

    def down(self, packets, nbytes, transport=None):
        with self._lock:
            self.down_packets += packets
            self.down_bytes += nbytes
            if transport:
                counts = self._of(transport)
                counts[2] += packets
                counts[3] += nbytes

    def drop(self, count=1):
        with self._lock:
            self.dropped += count

    def reconnect(self):
        with self._lock:
            self.reconnects += 1

    def set_connected(self, value):
        self.connected = bool(value)

    def line(self, transport, rtt=None, switches=0):
        """The status line; `rtt` in seconds (None: not measured yet)."""
        with self._lock:
            return ("relay %s up=%d/%d down=%d/%d dropped=%d reconnects=%d connected=%s rtt=%s switches=%d" % (
                transport, self.up_packets, self.up_bytes, self.down_packets, self.down_bytes,
                self.dropped, self.reconnects, "yes" if self.connected else "no",
                "-" if rtt is None else "%.1fms" % (rtt * 1000), switches))

    def snapshot(self):
        """The counters as a dict (the JSON status's "bytes" and "packets")."""
        with self._lock:
            return {"up_packets": self.up_packets, "up_bytes": self.up_bytes,
                    "down_packets": self.down_packets, "down_bytes": self.down_bytes,
                    "dropped": self.dropped, "reconnects": self.reconnects,
                    "per_transport": {name: {"up_packets": c[0], "up_bytes": c[1], "down_packets": c[2],
                                             "down_bytes": c[3]} for name, c in sorted(self.per_transport.items())}}


class Backoff:
    """0.5 s doubling to 30 s, each delay jittered by +-25 % so that many
    relays cut off by the same server restart do not come back in lockstep.

    When a connection that worked for FAST_AFTER seconds or more is lost,
    the retries come fast for FAST_FOR seconds: the first at once (within
    FAST_JITTER), then every FAST_STEP.  A server restart or reload closes
    tunnels cleanly and is back within about that time, and WireGuard's
    session behind the tunnel is still good, so the tunnel goes on without a
    new handshake.  A server that accepts and then closes at once gets the
    doubling delays.
    """

    FAST_AFTER = 2.0
    FAST_FOR = 3.0
    FAST_STEP = 0.25
    FAST_JITTER = 0.1  # spreads thousands of relays over 100 ms

    def __init__(self, first=0.5, cap=30.0, clock=time.monotonic):
        self.first = first
        self.cap = cap
        self.clock = clock
        self._next = first
        self._up_since = None  # when the connection now lost started working; None while failing
        self._fast_until = 0.0

    def reset(self):
        """The connection (or a request on it) worked."""
        self._next = self.first
        if self._up_since is None:
            self._up_since = self.clock()

    def next_delay(self):
        now, up_since = self.clock(), self._up_since
        self._up_since = None
        if up_since is not None and now - up_since >= self.FAST_AFTER:
            self._fast_until = now + self.FAST_FOR
            return random.uniform(0, self.FAST_JITTER)
        if now < self._fast_until:
            return self.FAST_STEP * random.uniform(0.75, 1.25)
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.75, 1.25)

    def wait(self, stopping):
        """Sleep one step; True if the relay is stopping meanwhile."""
        return stopping.wait(self.next_delay())


class LocalPort:
    """The UDP socket local WireGuard talks to.

    Non-blocking, so that one wake-up can take every datagram already
    waiting (receive_many): a transport then sends them as one batch
    instead of paying a wake-up, a lock and a write per datagram.
    """

    def __init__(self, host, port):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
        except OSError:
            sock.close()
            raise
        self.port = Port(sock, POLL_SECONDS)
        self.sock = sock
        self.peer = None

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    @property
    def gso(self):
        return self.port.gso

    def receive_many(self, limit=DRAIN):
        """The datagrams waiting (at most about `limit`), after waiting up to POLL_SECONDS for the first."""
        got = self.port.take(limit)
        if got:
            self.peer = got[-1][1]
        return [data for data, _ in got]

    def receive(self):
        """One datagram from WireGuard, or None after POLL_SECONDS."""
        got = self.receive_many(1)
        return got[0] if got else None

    def send(self, datagrams):
        """Send to local WireGuard, equal-sized runs in one system call each; (packets, bytes) sent."""
        peer = self.peer
        if peer is None:
            return 0, 0
        return self.port.send(datagrams, peer)

    def close(self):
        self.port.close()


class Transport:
    """What every transport is to the relay (the relay passes itself in; a
    transport never imports relay.py).

    The relay starts workers() in threads of its own, calls send() from its
    one uplink thread and tick() from its monitor thread every TICK seconds;
    a transport hands what the server sent to relay.deliver(datagrams, self).
    tick() returns why the path is dead (a sentence) or None; kick() drops
    the connection so that the transport makes a new one at once; close()
    ends it for good.  Each transport has its own `stopping`, so the relay
    can close one (auto mode) and keep the others.
    """

    name = ""

    def __init__(self, relay):
        self.relay = relay
        self.stopping = threading.Event()
        self.live = Liveness()
        self.ready = False  # can carry datagrams now (connected)
        self.failures = 0  # connection attempts failed in a row
        self.opened_at = time.monotonic()

    @property
    def rtt(self):
        return self.live.srtt

    def workers(self):
        return []

    def send(self, batch):
        raise NotImplementedError

    def tick(self, now):
        return None

    def kick(self, reason):
        pass

    def close(self):
        self.stopping.set()
        self.ready = False
