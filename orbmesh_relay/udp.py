"""UDP transport of the client relay: WireGuard's datagrams straight to the
node's WireGuard port, as if the relay were not there, plus the probes
that tell whether UDP works both ways (probe.py, docs/tunnel-protocol.md).

One unconnected socket does both, so a probe proves the very source
address and port, NAT mapping and firewall state the WireGuard datagrams
use (only the destination port differs: the node's ORBMESH_PROBE_PORT).
Unconnected also means each send takes the route of the moment: when the
laptop's address changes, the next datagram leaves from the new one and
the node's WireGuard roams to it, with nothing to reconnect.

Threads: "udp" reads the socket, hands WireGuard's datagrams to the relay
and checks probe replies; "udp-ticket" fetches (and renews) the probe
ticket over HTTPS.  Sending happens in the relay's uplink thread.
"""
import base64
import http.client
import json
import logging
import os
import socket
import threading
import time
from urllib.parse import urlsplit

from . import probe, route
from .common import DRAIN, POLL_SECONDS, UDP_BUFFER, Backoff, Transport, Unauthorized, unauthorized_message
from .framing import is_wireguard
from .udpio import Port

log = logging.getLogger(__name__)

PROBE_PATH = "/wireguard/probe"
DEFAULT_PORT = 51820
TICKET_TIMEOUT = 10.0
RTT_EVERY = 10.0  # a probe this often while UDP carries, for the round-trip time
PROBE_WAIT = 1.0  # a check's probe not answered within this is lost


class TicketError(Exception):
    """The server's answer to POST /wireguard/probe is not usable; fetched again later."""


def parse_endpoint(text):
    """'HOST:PORT' or '[IPV6]:PORT' -> (host, port); the port defaults to 51820."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError("--endpoint must be HOST:PORT or [IPV6]:PORT")
        port = rest[1:]
        if rest and not port:
            raise ValueError("--endpoint must be HOST:PORT or [IPV6]:PORT")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""  # a name, an IPv4 address or a bare IPv6 address: the default port
    if not host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        raise ValueError("--endpoint must be HOST:PORT or [IPV6]:PORT")
    return host, int(port) if port else DEFAULT_PORT


def fetch_ticket(url, token, ssl_context=None, timeout=TICKET_TIMEOUT):
    """POST /wireguard/probe: the probe port, ticket, key and the server's clock; None if probes are off."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", parts.path.rstrip("/") + PROBE_PATH, body=b"{}",
                     headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read(64 * 1024)
    finally:
        conn.close()
    if response.status in (401, 403):
        raise Unauthorized(unauthorized_message(response.status))
    if response.status == 404:
        return None
    if response.status != 200:
        raise TicketError("HTTP %d" % response.status)
    try:
        answer = json.loads(body)
        ticket = base64.b64decode(answer["ticket"], validate=True)
        key = base64.b64decode(answer["key"], validate=True)
        port = int(answer["port"])
        offset = float(answer["serverTime"]) - time.time()
        lifetime = float(answer["expiresIn"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TicketError("not a probe ticket: %s" % exc) from None
    if len(ticket) != probe.TICKET_SIZE or len(key) != 32 or not 0 < port < 65536 or lifetime <= 0:
        raise TicketError("not a probe ticket")
    return {"port": port, "ticket": ticket, "key": key, "offset": offset,
            "renew_at": time.monotonic() + lifetime * 0.75}


class Check:
    """A train of probes: COUNT of them SPACING apart; passed when NEEDED came back."""

    COUNT = 12
    SPACING = 0.25
    NEEDED = 11

    def __init__(self, now):
        self.sent = self.answered = 0
        self.next_at = now
        self.last_sent = None

    def due(self, now):
        return self.sent < self.COUNT and now >= self.next_at

    def done(self, now):
        return self.sent >= self.COUNT and (self.answered >= self.sent or now - self.last_sent >= PROBE_WAIT)

    @property
    def passed(self):
        return self.answered >= self.NEEDED


class UdpTransport(Transport):
    name = "udp"

    def __init__(self, relay):
        super().__init__(relay)
        host, port = relay.endpoint
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self.family, self.target = info[0], info[4][:2]
        self.port = self._open()
        self.ticket = None
        self.probes_off = False
        self.check = None
        self.network_changed = None  # a sentence, set when the route's source address changed
        self._pending = {}  # nonce -> (sent at, part of a check)
        self._last_rtt_probe = 0.0
        self._last_route = 0.0
        self._source = route.source_for(self.target)
        self._renew = threading.Event()
        self.measure_rtt = False
        self.ready = True

    def _open(self):
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", 0))
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
        except OSError:
            sock.close()
            raise
        return Port(sock, POLL_SECONDS)

    def workers(self):
        return [(self._receiver, "relay-udp"), (self._tickets, "relay-udp-ticket")]

    # --- datagrams ---------------------------------------------------------------------------

    def send(self, batch):
        packets, size = self.port.send(batch, self.target)
        if packets:
            self.relay.stats.up(packets, size, self.name)
            self.live.sent(time.monotonic())
        if packets < len(batch):
            self.relay.stats.drop(len(batch) - packets)

    def _receiver(self):
        while not self.stopping.is_set():
            port = self.port
            try:
                got = port.take(DRAIN)
            except (OSError, ValueError):
                if port is self.port and not self.stopping.is_set():
                    raise
                continue  # kick() replaced the socket under us
            if got:
                self._arrived(got, time.monotonic())

    def _arrived(self, got, now):
        datagrams = []
        ticket = self.ticket
        for data, address in got:
            if address[0] != self.target[0]:
                self.relay.stats.drop()
            elif address[1] == self.target[1]:
                if is_wireguard(data):
                    datagrams.append(data)
                else:
                    # Anyone on the path can send UDP: a bad datagram is dropped, not a failed path.
                    self.relay.stats.drop()
            elif ticket is not None and address[1] == ticket["port"]:
                self._reply(data, ticket, now)
            else:
                self.relay.stats.drop()
        if datagrams:
            self.live.answered(now)
            self.relay.deliver(datagrams, self)

    # --- probes ------------------------------------------------------------------------------

    def send_probe(self, now, in_check=False):
        ticket = self.ticket
        if ticket is None:
            return False
        nonce = os.urandom(8)
        self._pending[nonce] = (now, in_check)
        if len(self._pending) > 256:  # replies that never came
            for old in sorted(self._pending, key=lambda n: self._pending[n][0])[:128]:
                self._pending.pop(old, None)
        datagram = probe.request(ticket["ticket"], ticket["key"], nonce, time.time() + ticket["offset"])
        try:
            self.port.sock.sendto(datagram, (self.target[0], ticket["port"]))
        except OSError as exc:
            log.debug("probe send failed: %s", exc)
        return True

    def _reply(self, data, ticket, now):
        parsed = probe.parse_reply(data, ticket["key"])
        if parsed is None:
            self.relay.stats.drop()
            return
        nonce, seen = parsed
        sent = self._pending.pop(nonce, None)
        if sent is None:
            return  # a duplicate, or one given up on
        sent_at, in_check = sent
        self.live.answered(now, asked_at=sent_at)
        self.live.sample(now - sent_at)
        if in_check and self.check is not None and now - sent_at <= PROBE_WAIT:
            self.check.answered += 1
        log.debug("probe answered in %.1f ms; the node sees us at %s port %d", (now - sent_at) * 1000, *seen)

    def start_check(self, now):
        """Begin a train of probes; False when there is no ticket (probes off, or none yet)."""
        if self.ticket is None:
            if not self.probes_off:
                self._renew.set()
            return False
        self.check = Check(now)
        return True

    def check_result(self, now):
        """None while the running check goes on; else (passed, answered, sent), and the check ends."""
        check = self.check
        if check is None or not check.done(now):
            return None
        self.check = None
        if not check.passed:
            self._renew.set()  # the server may have restarted: a fresh ticket for the next check
        return check.passed, check.answered, check.sent

    # --- the monitor's tick ------------------------------------------------------------------

    def tick(self, now):
        check = self.check
        if check is not None and check.due(now):
            check.sent += 1
            check.last_sent = now
            check.next_at = now + check.SPACING
            self.send_probe(now, in_check=True)
        if self.live.needs_check(now) and self.send_probe(now):
            self.live.checked(now)
        elif self.measure_rtt and now - self._last_rtt_probe >= RTT_EVERY:
            self._last_rtt_probe = now
            self.send_probe(now)
        if now - self._last_route >= route.CHECK_EVERY:
            self._last_route = now
            source = route.source_for(self.target)
            if source != self._source:
                # The socket follows the route by itself; the controller may want to look again at UDP.
                self.network_changed = "local address changed from %s to %s" % (self._source, source)
                self._source = source
        if self.live.dead(now):
            return "no answer over udp for %.1f s" % self.live.silent_for(now)
        return None

    def kick(self, reason):
        """A new socket (a new source port, a new NAT mapping); the old one is closed."""
        old, self.port = self.port, self._open()
        self.live.reset()
        old.close()

    # --- the ticket --------------------------------------------------------------------------

    def _tickets(self):
        relay = self.relay
        backoff = Backoff(first=1.0, cap=60.0)
        while not self.stopping.is_set():
            try:
                ticket = fetch_ticket(relay.url, relay.token, relay.ssl_context)
            except (OSError, http.client.HTTPException, TicketError) as exc:
                log.debug("probe ticket: %s; retrying", exc)
                if backoff.wait(self.stopping):
                    return
                continue
            if ticket is None:
                self.probes_off = True
                log.warning("the server has UDP probes off (404 for POST %s): the relay will not move back "
                            "to UDP by itself", PROBE_PATH)
                return
            backoff.reset()
            self.ticket = ticket
            self._renew.clear()
            wait = max(1.0, ticket["renew_at"] - time.monotonic())
            self._renew.wait(wait)
            if self._renew.is_set():
                # Asked for early (a failed check): not more than once every few seconds.
                self.stopping.wait(5.0)

    def close(self):
        super().close()
        self._renew.set()
        self.port.close()
