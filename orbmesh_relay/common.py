"""What the relay and both transports share: the counters behind the status
line, the reconnect backoff, the UDP port local WireGuard talks to, and the
one error no retry can cure.

Kept apart from relay.py so that the transports can use it while relay.py
imports the transports: the modules form no circle.
"""
import errno
import logging
import random
import select
import socket
import threading
import time

from .framing import MAX_DATAGRAM, gso_control, gso_runs

log = logging.getLogger(__name__)

TOKEN_ENV = "ORBMESH_RELAY_TOKEN"
POLL_SECONDS = 0.5  # how long a blocking read may delay noticing a stop
DRAIN = 64  # datagrams taken from local WireGuard per wake-up
UDP_BUFFER = 1 << 20  # room for bursts while a transport thread is busy


class Unauthorized(Exception):
    """The server refused the token: retrying cannot help."""


def unauthorized_message():
    return "the server refused the token (401); check --token or %s" % TOKEN_ENV


class Stats:
    """Counters shared by every thread of one relay (the status line's
    format is documented in the package docstring)."""

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

    gso = True  # until a kernel refuses UDP_SEGMENT (framing.gso_runs)

    def __init__(self, host, port):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                self.sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)
        self.peer = None

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    def receive_many(self, limit=DRAIN):
        """The datagrams waiting (at most `limit`), after waiting up to POLL_SECONDS for the first."""
        if not self._poll.poll(POLL_SECONDS * 1000):
            return []
        out = []
        while len(out) < limit:
            try:
                data, peer = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                break
            self.peer = peer
            out.append(data)
        return out

    def receive(self):
        """One datagram from WireGuard, or None after POLL_SECONDS."""
        got = self.receive_many(1)
        return got[0] if got else None

    def send(self, datagrams):
        """Send to local WireGuard, equal-sized runs in one system call each; (packets, bytes) sent."""
        peer = self.peer
        if peer is None:
            return 0, 0
        packets = size = 0
        for segment, run in gso_runs(datagrams) if LocalPort.gso else [(0, [d]) for d in datagrams]:
            try:
                if len(run) == 1:
                    self.sock.sendto(run[0], peer)
                else:
                    self.sock.sendmsg([b"".join(run)], gso_control(segment), 0, peer)
            except OSError as exc:
                if len(run) > 1 and exc.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT):
                    LocalPort.gso = False  # no UDP segmentation here: one send per datagram
                    more = self.send(run)
                    packets, size = packets + more[0], size + more[1]
                    continue
                # BlockingIOError included: local WireGuard is not keeping up,
                # and the datagrams are lost as UDP would lose them.
                log.debug("local send failed: %s", exc)
                continue
            packets += len(run)
            size += sum(map(len, run))
        return packets, size

    def close(self):
        self.sock.close()
