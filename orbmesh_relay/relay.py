"""Relay: one local UDP port, the transport(s) behind it and the threads
that move datagrams between them (docs/tunnel-protocol.md).

    local WireGuard ──UDP──▶ uplink thread ──▶ controller.route() ──▶ transport.send()
    local WireGuard ◀──UDP── deliver()  ◀── a transport's receiving thread
                             monitor thread: controller.tick() every TICK s, the status file

The controller is Fixed (--transport udp|ws|http: one transport,
reconnected when its liveness or the route says it is dead) or Auto
(auto.py: the best path now, and switches).  Transports get the relay
passed in and use only its attributes and common.py; they never import
this module.
"""
import logging
import os
import ssl
import threading
import time
from urllib.parse import urlsplit

from .auto import Auto
from .common import Backoff, LocalPort, Stats, Unauthorized
from .framing import MIN_WIREGUARD
from .http import HttpTransport
from .status import StatusFile, status_dict
from .udp import UdpTransport, parse_endpoint
from .ws import WsTransport

log = logging.getLogger(__name__)

TRANSPORTS = {"udp": UdpTransport, "ws": WsTransport, "http": HttpTransport}
MODES = ("auto",) + tuple(TRANSPORTS)
TICK = 0.05  # the monitor's period: liveness, timers, route checks
STATUS_EVERY = 1.0  # the status file is rewritten this often (and at every switch)
SWITCHES_KEPT = 1000


def transport_class(name):
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise ValueError("unknown transport %r" % name) from None


class Fixed:
    """One transport, chosen by the user; a dead path is made again, never switched.

    The first time the path dies it is made again at once and a warning logged; while it stays dead
    (nothing answered since) it is made again after 1 s, 2 s, 4 s ... up to 30 s, logged at debug:
    a UDP path blocked for an hour is not a new socket and a log line every second.
    """

    def __init__(self, relay, name):
        self.relay = relay
        self.current = transport_class(name)(relay)
        self.current.measure_rtt = True
        self._failing = None  # (since, next kick at, the wait after it) while dead and unanswered

    @property
    def state(self):
        return "connected" if self.current.ready else "connecting"

    def transports(self):
        return [self.current]

    def start(self):
        self.relay.launch(self.current)

    def route(self, batch):
        self.current.send(batch)

    def delivered(self, transport, datagrams):
        pass

    def tick(self, now):
        current = self.current
        reason = current.tick(now)
        if self._failing is not None and (current.live.last_answer or 0) > self._failing[0]:
            log.info("%s answers again", current.name)
            self._failing = None
        if not reason:
            return
        if self._failing is None:
            log.warning("%s: %s; connecting again", current.name, reason)
            self._failing = (now, now + 1.0, 2.0)
        elif now < self._failing[1]:
            return
        else:
            log.debug("%s: %s; connecting again", current.name, reason)
            since, _, wait = self._failing
            self._failing = (since, now + wait, min(30.0, wait * 2))
        self.relay.stats.reconnect()
        current.kick(reason)

    def details(self, now):
        return {}

    def close(self):
        self.current.close()


class Relay:
    """One relay: a local port, a controller, its transports and threads.

    Apps embed it as it is (docs/api.md, "The relay as a library"); tests
    drive it directly; cli.run() adds signals and the status printer.
    """

    def __init__(self, transport, url, token, listen, *, ssl_context=None, http_senders=1,
                 session=None, backoff_first=0.5, endpoint=None, status_file=None):
        if transport not in MODES:
            raise ValueError("unknown transport %r" % transport)
        self.mode = transport
        self.url = url
        self.token = token
        if ssl_context is None and urlsplit(url).scheme == "https":
            ssl_context = ssl.create_default_context()  # the system's CAs, the host name checked
        self.ssl_context = ssl_context
        self.http_senders = http_senders
        self.session = session or "relay-" + os.urandom(8).hex()
        self.backoff_first = backoff_first
        self.endpoint = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
        if self.endpoint is None:
            self.endpoint = parse_endpoint(_host_of(url))
        self.stats = Stats()
        self.stopping = threading.Event()
        self.fatal = None
        self.switches = []  # {"at", "from", "to", "reason"}, the last SWITCHES_KEPT
        self.switch_count = 0
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._threads = []
        self.local = LocalPort(*listen)
        try:
            self.control = Auto(self) if transport == "auto" else Fixed(self, transport)
        except BaseException:
            self.local.close()
            raise
        self.status_file = StatusFile(status_file) if status_file else None

    # --- what tests and the status read ----------------------------------------------------------

    @property
    def transport(self):
        """The transport carrying datagrams now (None while auto mode is still connecting)."""
        return self.control.current

    @property
    def transport_name(self):
        current = self.control.current
        return current.name if current is not None else "none"

    def _refresh_connected(self):
        current = self.control.current
        self.stats.set_connected(current is not None and current.ready and self.control.state == "connected")

    def status_line(self):
        self._refresh_connected()
        current = self.control.current
        return self.stats.line(self.transport_name, current.rtt if current is not None else None,
                               self.switch_count)

    def status(self):
        """The JSON status (docs/api.md): current transport, RTT, bytes, switches."""
        if not self.stopping.is_set():
            self._refresh_connected()
        return status_dict(self, time.monotonic())

    # --- threads ------------------------------------------------------------------------------------

    def start(self):
        self._spawn(self._uplink, "relay-uplink")
        self._spawn(self._monitor, "relay-monitor")
        self.control.start()
        return self

    def launch(self, transport):
        """Start a transport's threads (the controller decides when)."""
        for target, name in transport.workers():
            self._spawn(target, name)

    def _spawn(self, target, name):
        thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

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

    def local_batches(self):
        """Lists of the datagrams local WireGuard sent, until the relay stops.

        Datagrams shorter than the smallest WireGuard message are counted as
        dropped: a batch cannot carry one (framing.MIN_WIREGUARD; the server
        refuses the whole batch), and WireGuard would drop it anyway.
        """
        while not self.stopping.is_set():
            try:
                batch = self.local.receive_many()
            except (OSError, ValueError):
                if self.stopping.is_set():
                    return
                raise
            short = sum(1 for data in batch if len(data) < MIN_WIREGUARD)
            if short:
                self.stats.drop(short)
                batch = [data for data in batch if len(data) >= MIN_WIREGUARD]
            if batch:
                yield batch

    def _uplink(self):
        for batch in self.local_batches():
            self.control.route(batch)

    def _monitor(self):
        next_status = 0.0
        while not self.stopping.wait(TICK):
            now = time.monotonic()
            self.control.tick(now)
            self._refresh_connected()
            if self.status_file is not None and now >= next_status:
                next_status = now + STATUS_EVERY
                self.status_file.write(self.status)

    def deliver(self, datagrams, transport=None):
        """Datagrams from the server, to local WireGuard."""
        if transport is not None:
            self.control.delivered(transport, datagrams)
        packets, size = self.local.send(datagrams)
        if packets:
            self.stats.down(packets, size, transport.name if transport is not None else None)
        if packets < len(datagrams):
            self.stats.drop(len(datagrams) - packets)

    def switched(self, old, new, reason):
        """Called by the controller at every switch: kept for the status, one log line."""
        entry = {"at": round(time.time(), 3), "from": old, "to": new, "reason": reason}
        with self._lock:
            self.switches.append(entry)
            del self.switches[:-SWITCHES_KEPT]
            self.switch_count += 1
        log.info("switch %s -> %s: %s", old or "none", new, reason)
        if self.status_file is not None:
            self.status_file.write(self.status)

    def fail(self, message):
        if self.fatal is None:
            self.fatal = message
        self.stopping.set()

    def stop(self, timeout=5.0):
        self.stopping.set()
        self.control.close()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.local.close()
        self.stats.set_connected(False)
        if self.status_file is not None:
            self.status_file.write(self.status)


def _host_of(url):
    host = urlsplit(url).hostname or ""
    return "[%s]" % host if ":" in host else host
