"""--transport auto: whichever path works best now, and the switches between
paths, without the WireGuard client noticing (docs/tunnel-protocol.md,
"Transport auto", has the state machine and every timer).

    connecting ──first answer──▶ on udp ◀──check passes── on ws / http
                                  │  ▲                       ▲  │
                                  │  └── udp fails in TRIAL ─┘  │ (flap: checks less often)
                                  └──── dead: ws, then http ────┘

- connecting: the client's datagrams go over UDP at once; WebSocket opens
  HE_DELAY after the first of them, HTTP when WebSocket is not up
  TCP_GRACE after it opened (or has failed).  A TCP path that comes up
  gets the client's latest handshake initiation again (the one UDP may
  have lost) and every datagram from then on.  The first path that
  brings anything back from the node wins; the others are closed.
- on a path: everything goes over it.  Its liveness (liveness.py) or a
  route change (route.py) says it is dead: the same kind is connected
  again (a TCP path) and the others are tried (WebSocket at once, HTTP
  after TCP_GRACE); the client's datagrams still go over the dead path
  until another is up ("make before break").
- on WebSocket or HTTP: every CHECK_FIRST s, growing by CHECK_GROWTH to
  CHECK_MAX (each +-JITTER), a train of probes (udp.py Check) asks whether
  UDP works both ways; at once after a route change.  When it passes the
  relay moves to UDP and keeps the old path open for TRIAL s: datagrams
  still in flight on it are delivered, and if UDP dies within TRIAL the
  relay goes straight back and counts a flap: the next check then waits
  FLAP_FIRST s, doubling to FLAP_MAX.  UDP holding for FLAP_FORGET s
  forgets the flaps.

WireGuard's session is the same across every switch: the node moves the
peer's endpoint to where its latest authenticated datagram came from, and
the relay never sends the client's datagrams over a UDP path that has not
answered probes (probe.py).
"""
import logging
import random
import threading
import time

from .http import HttpTransport
from .udp import UdpTransport
from .ws import WsTransport

log = logging.getLogger(__name__)

HE_DELAY = 0.25
TCP_GRACE = 1.0
CHECK_FIRST = 10.0
CHECK_GROWTH = 1.5
CHECK_MAX = 20.0
JITTER = 0.15
NO_TICKET_RETRY = 2.0
TRIAL = 15.0
FLAP_FIRST = 30.0
FLAP_MAX = 120.0
FLAP_FORGET = 120.0
INITIATION = 1  # WireGuard's message type 1


def jittered(seconds):
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


class Auto:
    def __init__(self, relay):
        self.relay = relay
        self.udp = UdpTransport(relay)
        self.ws = self.http = None
        self.current = None
        self.lost = None  # (since, why) while the current path is dead and another is sought
        self.connecting_since = None
        self.initiation = None  # the client's latest handshake initiation
        self.replayed = set()  # TCP transports that got it
        self.interval = CHECK_FIRST
        self.next_check = None
        self.last_check = None
        self.trial = None  # (until, the TCP transport we came from) after a move to UDP
        self.flaps = 0
        self.udp_since = None
        self._lock = threading.RLock()

    # --- what the relay asks -----------------------------------------------------------------

    @property
    def state(self):
        if self.current is None:
            return "connecting"
        return "lost" if self.lost else "connected"

    def transports(self):
        return [t for t in (self.udp, self.ws, self.http) if t is not None]

    def start(self):
        self.relay.launch(self.udp)

    def route(self, batch):
        """From the uplink thread: where the client's datagrams go now."""
        current = self.current
        if current is not None and self.lost is None:
            current.send(batch)
            return
        now = time.monotonic()
        for datagram in batch:
            if datagram[0] == INITIATION:
                self.initiation = datagram
        with self._lock:
            if self.current is None and self.connecting_since is None:
                self.connecting_since = now
            targets = [self.current or self.udp]
            targets += [t for t in (self.ws, self.http) if t is not None and t.ready and t not in targets]
        for transport in targets:
            transport.send(batch)

    def delivered(self, transport, datagrams):
        """From a receiving thread: while connecting, the first path with an answer wins."""
        if self.current is not None:
            return
        with self._lock:
            if self.current is None:
                self._switch(transport, "first answer from the node came over %s" % transport.name)

    def tick(self, now):
        with self._lock:
            for transport in self.transports():
                reason = transport.tick(now)
                if not reason:
                    continue
                if transport is self.current:
                    if not self.lost:
                        self._lose(now, reason)
                elif transport is not self.udp:
                    log.info("%s (not carrying): %s; connecting again", transport.name, reason)
                    transport.kick(reason)
            changed, self.udp.network_changed = self.udp.network_changed, None
            if changed and self.current is not None and self.current is not self.udp:
                log.info("%s: looking at udp again now", changed)
                self.next_check = now
            if self.current is None:
                self._connecting(now)
            elif self.lost:
                self._recover(now)
            elif self.current is self.udp:
                self._on_udp(now)
            else:
                self._move_back(now)

    def details(self, now):
        """Auto's part of the JSON status."""
        udp = self.udp
        probes = "off" if udp.probes_off else ("ready" if udp.ticket else "waiting for a ticket")
        return {"udp_probes": probes,
                "udp_check_running": udp.check is not None,
                "next_udp_check_in_s": (round(max(0.0, self.next_check - now), 1)
                                        if self.next_check is not None and self.current is not self.udp else None),
                "last_udp_check": self.last_check,
                "flaps": self.flaps,
                "lost": self.lost[1] if self.lost else None}

    def close(self):
        for transport in self.transports():
            transport.close()

    # --- states ---------------------------------------------------------------------------------

    def _connecting(self, now):
        if self.connecting_since is None:
            return  # the client has sent nothing yet: nothing to race for
        if self.ws is None and now >= self.connecting_since + HE_DELAY:
            self.ws = self._open(WsTransport)
        self._second_tcp(now, self.ws)
        for transport in (self.ws, self.http):
            if transport is not None and transport.ready and transport not in self.replayed:
                self.replayed.add(transport)
                if self.initiation is not None:
                    transport.send([self.initiation])

    def _second_tcp(self, now, first):
        """HTTP beside WebSocket once WebSocket has failed or is not up TCP_GRACE after it opened."""
        if self.http is None and first is not None and not first.ready and (
                first.failures or now >= first.opened_at + TCP_GRACE):
            self.http = self._open(HttpTransport)

    def _lose(self, now, reason):
        current = self.current
        if current is self.udp and self.trial is not None:
            _, standby = self.trial
            self.trial = None
            self.flaps += 1
            self.interval = min(FLAP_MAX, FLAP_FIRST * 2 ** (self.flaps - 1))
            self.next_check = None
            if standby.ready:
                self._switch(standby, "udp failed %.1f s after moving to it (%s)" % (now - self.udp_since, reason))
                return
        elif current is self.udp and self.flaps == 0:
            self.interval = CHECK_FIRST
        self.lost = (now, reason)
        log.warning("%s: %s; looking for another path", current.name, reason)
        if current is not self.udp:
            self.relay.stats.reconnect()
            current.ready = False
            current.kick(reason)

    def _recover(self, now):
        since, reason = self.lost
        current = self.current
        if current is not self.udp and current.ready:
            log.info("%s connected again", current.name)
            self.lost = None
            return
        if current is self.udp and current.live.silent_for(now) == 0 and (current.live.last_answer or 0) > since:
            log.info("udp answers again before another path was up; staying on udp")
            self.lost = None
            for transport in (self.ws, self.http):
                if transport is not None:
                    self._close(transport)
            return
        if current is self.udp:
            if self.ws is None:
                self.ws = self._open(WsTransport)
            self._second_tcp(now, self.ws)
        elif current is self.ws:
            if now >= since + TCP_GRACE and self.http is None:
                self.http = self._open(HttpTransport)
        elif now >= since + TCP_GRACE and self.ws is None:
            self.ws = self._open(WsTransport)
        for candidate in (self.ws, self.http):
            if candidate is not None and candidate is not current and candidate.ready:
                self._switch(candidate, reason)
                return

    def _move_back(self, now):
        udp = self.udp
        if udp.probes_off:
            return
        if self.next_check is None:
            self.next_check = now + jittered(self.interval)
        if udp.check is None:
            if now >= self.next_check and not udp.start_check(now):
                self.next_check = now + NO_TICKET_RETRY
            return
        result = udp.check_result(now)
        if result is None:
            return
        passed, answered, sent = result
        self.last_check = {"at": round(time.time(), 3), "passed": passed, "answered": answered, "sent": sent}
        if not passed:
            if self.flaps == 0:
                self.interval = min(CHECK_MAX, self.interval * CHECK_GROWTH)
            self.next_check = now + jittered(self.interval)
            return
        old = self.current
        self._switch(udp, "udp answers again (%d of %d probes)" % (answered, sent))
        self.trial = (now + TRIAL, old)
        self.udp_since = now

    def _on_udp(self, now):
        if self.trial is not None and now >= self.trial[0]:
            standby = self.trial[1]
            self.trial = None
            self._close(standby)
        if self.flaps and self.udp_since is not None and now - self.udp_since >= FLAP_FORGET:
            self.flaps = 0
            self.interval = CHECK_FIRST

    # --- moving -----------------------------------------------------------------------------------

    def _switch(self, new, reason):
        old = self.current
        self.current = new
        self.lost = None
        self.udp.measure_rtt = new is self.udp
        self.udp.live.reset()
        if new is self.udp:
            if self.udp_since is None:
                self.udp_since = time.monotonic()
        else:
            self.next_check = time.monotonic() + jittered(self.interval)
            self.udp_since = None
        # The other TCP transport goes, unless it is the way back from a UDP trial.
        keep = {new}
        if new is self.udp and old is not None:
            keep.add(old)
        for transport in (self.ws, self.http):
            if transport is not None and transport not in keep:
                self._close(transport)
        self.relay.switched(old.name if old is not None else None, new.name, reason)

    def _open(self, cls):
        transport = cls(self.relay)
        transport.measure_rtt = True
        self.relay.launch(transport)
        log.info("opening %s", transport.name)
        return transport

    def _close(self, transport):
        if transport is self.ws:
            self.ws = None
        if transport is self.http:
            self.http = None
        self.replayed.discard(transport)
        # Not in this thread: a WebSocket close may wait for a send in progress.
        threading.Thread(target=transport.close, name="relay-close-%s" % transport.name, daemon=True).start()
