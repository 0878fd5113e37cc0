"""Tunnel sessions: a UDP socket to our WireGuard per session, and their limits.

Everything here lives in one worker process: the sockets, the HTTP
sessions' queues, and the per-device session count.  The README says how a
deployment keeps one device's requests on one worker.
"""
import collections
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from orbmesh_relay.framing import MAX_DATAGRAM, is_wireguard, record_size
from orbmesh_relay.udpio import send_runs

from ..failures import TooManySessions
from ..ops.metrics import tunnel_meter

log = logging.getLogger(__name__)

UDP_BUFFER = 1 << 20  # room for bursts between two reads of the session
DRAIN = 64  # datagrams taken from WireGuard per wake-up


@dataclass
class Counters:
    up_packets: int = 0
    up_bytes: int = 0
    down_packets: int = 0
    down_bytes: int = 0
    dropped: int = 0  # not WireGuard, or pushed out of a full queue
    started: float = field(default_factory=time.monotonic)

    def line(self):
        return "up=%d/%d down=%d/%d dropped=%d" % (self.up_packets, self.up_bytes, self.down_packets,
                                                    self.down_bytes, self.dropped)


class UdpPipe:
    """A UDP socket connected to the local WireGuard listen port.

    Connected, so the kernel drops anything not coming from WireGuard itself.
    A lazy pipe opens its socket with the first datagram it sends: until
    then WireGuard cannot know the socket's port, so there is nothing to
    read, and an idle WebSocket session holds no socket.
    """

    gso = True  # until a kernel refuses UDP_SEGMENT

    def __init__(self, host, port, transport="http", lazy=False):
        self.target = (host, port)
        self.sock = None
        self._poll = None
        self.counters = Counters()
        self.meter = tunnel_meter(transport)
        if not lazy:
            self._open()

    def _open(self):
        host, port = self.target
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
            sock.connect((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def send(self, datagrams):
        """Pass WireGuard datagrams on, equal-sized runs in one system call each; drop and count the rest.

        Returns how many went to WireGuard: only those are a sign of a live
        tunnel (app/tunnel/wsconn.py's idle timer).
        """
        valid = [d for d in datagrams if is_wireguard(d)]
        if len(valid) < len(datagrams):
            self.counters.dropped += len(datagrams) - len(valid)
            self.meter.dropped("not_wireguard", len(datagrams) - len(valid))
        if not valid:
            return 0
        if self.sock is None:
            self._open()
        packets, size, lost, gso = send_runs(self.sock, valid, self.gso)
        if self.gso and not gso:
            UdpPipe.gso = False  # a kernel without UDP segmentation: one send per datagram, in every pipe
            log.warning("UDP segmentation offload refused; sending datagrams one by one")
        if lost:
            # WireGuard not listening right now (ECONNREFUSED from an earlier
            # ICMP), or its socket full: lost, as on any UDP path.
            self.counters.dropped += lost
            self.meter.dropped("unreachable", lost)
        if packets:
            self.counters.up_packets += packets
            self.counters.up_bytes += size
            self.meter.up(size, packets)
        return packets

    def drain(self, limit):
        """Up to `limit` datagrams already waiting, without blocking (the socket is non-blocking)."""
        out = []
        while len(out) < limit:
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                continue  # an ICMP error for an earlier send
            out.append(data)
        if out:
            size = sum(map(len, out))
            self.counters.down_packets += len(out)
            self.counters.down_bytes += size
            self.meter.down(size, len(out))
        return out

    def receive_many(self, timeout, limit):
        """The datagrams waiting (at most `limit`), after waiting up to `timeout` s for the first."""
        if self._poll is None:
            # poll, not select(): a busy worker's descriptors pass select()'s limit of 1,024.
            self._poll = select.poll()
            self._poll.register(self.sock, select.POLLIN)
        return self.drain(limit) if self._poll.poll(timeout * 1000) else []

    def close(self):
        if self.sock is not None:
            self.sock.close()


class SessionSlots:
    """How many tunnel sessions each device holds in this process."""

    def __init__(self, limit):
        self.limit = limit
        self._held = collections.Counter()
        self._lock = threading.Lock()

    def acquire(self, device):
        with self._lock:
            if self._held[device] >= self.limit:
                raise TooManySessions("This device already has %d tunnel sessions" % self.limit)
            self._held[device] += 1

    def release(self, device):
        with self._lock:
            self._held[device] -= 1
            if self._held[device] <= 0:
                del self._held[device]

    def held(self, device):
        with self._lock:
            return self._held[device]


class HttpSession:
    """A UDP pipe, a bounded downstream queue, and the requests waiting on it."""

    def __init__(self, key, pipe, queue_size):
        self.key = key
        self.pipe = pipe
        self.queue = collections.deque()
        self.queue_size = queue_size
        self.last_used = time.monotonic()
        self.closed = False
        self._ready = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="tunnel-http-read", daemon=True)
        self._reader.start()
        pipe.meter.sessions.inc()

    def _read(self):
        while not self.closed:
            try:
                batch = self.pipe.receive_many(1.0, DRAIN)
            except (OSError, ValueError):  # closed under us
                break
            if not batch:
                continue
            with self._ready:
                self.queue.extend(batch)
                excess = len(self.queue) - self.queue_size
                for _ in range(max(0, excess)):
                    self.queue.popleft()
                if excess > 0:
                    self.pipe.counters.dropped += excess
                    self.pipe.meter.dropped("queue_full", excess)
                self._ready.notify_all()

    def take(self, wait, max_count=None, max_bytes=1 << 20, parked=None):
        """Queued datagrams (waiting up to `wait` s for the first, or until `parked` is evicted)."""
        deadline = time.monotonic() + wait
        with self._ready:
            while not self.queue and not self.closed and not (parked and parked.evicted):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            out, size = [], 0
            while self.queue and (max_count is None or len(out) < max_count):
                if out and size + record_size(self.queue[0]) > max_bytes:
                    break
                datagram = self.queue.popleft()
                size += record_size(datagram)
                out.append(datagram)
        self.last_used = time.monotonic()
        return out

    def close(self):
        if not self.closed:
            self.pipe.meter.sessions.dec()
        self.closed = True
        with self._ready:
            self._ready.notify_all()
        self.pipe.close()


class Parked:
    """One long poll waiting on a session."""

    __slots__ = ("session", "evicted")

    def __init__(self, session):
        self.session = session
        self.evicted = False

    def evict(self):
        with self.session._ready:
            self.evicted = True
            self.session._ready.notify_all()


class HttpSessions:
    """The HTTP tunnel sessions of this worker, keyed by (user, device, name)."""

    def __init__(self, config, slots):
        self.target = (config["TUNNEL_TARGET_HOST"], config["LISTEN_PORT"])
        self.queue_size = config["TUNNEL_QUEUE"]
        self.idle = config["TUNNEL_SESSION_IDLE"]
        self.slots = slots
        self.max_parked = config["TUNNEL_MAX_PARKED"]
        self._sessions = {}
        self._parked = collections.defaultdict(collections.deque)  # device -> its waiting polls, oldest first
        self._lock = threading.Lock()
        self._reaper = None

    def get(self, device, name, on_new=None):
        """The session `name` of `device`; a new one calls on_new() first (it may refuse by raising)."""
        key = device + (name,)
        with self._lock:
            session = self._sessions.get(key)
            if session is None or session.closed:
                if on_new is not None:
                    on_new()
                self.slots.acquire(device)
                try:
                    session = HttpSession(key, UdpPipe(*self.target, "http"), self.queue_size)
                except OSError:
                    self.slots.release(device)
                    raise
                self._sessions[key] = session
                log.info("tunnel http session start user=%s device=%s session=%s", *key)
                self._start_reaper()
            session.last_used = time.monotonic()
            return session

    def take(self, session, wait, **limits):
        """session.take(), with at most TUNNEL_MAX_PARKED polls of one device waiting at once.

        A poll over the limit evicts the device's oldest one, which answers
        at once with what it has (usually nothing): the client then simply
        polls again, and a device cannot pile up parked requests.
        """
        if wait <= 0 or session.queue:
            return session.take(0, **limits)
        device = session.key[:2]
        parked = Parked(session)
        with self._lock:
            waiting = self._parked[device]
            waiting.append(parked)
            evicted = [waiting.popleft() for _ in range(len(waiting) - self.max_parked)]
        for old in evicted:
            old.evict()
        try:
            return session.take(wait, parked=parked, **limits)
        finally:
            with self._lock:
                waiting = self._parked[device]
                if parked in waiting:
                    waiting.remove(parked)
                if not waiting:
                    del self._parked[device]

    def parked(self, device):
        with self._lock:
            return len(self._parked.get(device, ()))

    def _start_reaper(self):
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_forever, name="tunnel-http-reaper", daemon=True)
            self._reaper.start()

    def _reap_forever(self):
        while True:
            time.sleep(max(1.0, self.idle / 4))
            self.reap()

    def reap(self, now=None):
        """Close sessions idle for longer than TUNNEL_SESSION_IDLE; return how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [s for s in self._sessions.values() if now - s.last_used > self.idle]
            for session in expired:
                del self._sessions[session.key]
        for session in expired:
            session.close()
            self.slots.release(session.key[:2])
            log.info("tunnel http session end user=%s device=%s session=%s %s", *session.key,
                     session.pipe.counters.line())
        return len(expired)

    def close(self):
        """Close every session: the worker is stopping (app/ops/shutdown.py)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()
            self.slots.release(session.key[:2])

    def __len__(self):
        with self._lock:
            return len(self._sessions)
