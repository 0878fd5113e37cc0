"""The node's DNS resolver (Unbound on the gateway): what clients are told, and whether it answers.

Unbound is not ours to run: run-local and the orbmesh-unbound unit start
it (app/dns/unbound.py renders its config).  The app only names it in the
connect response and asks it one question for /health.
"""
import logging
import secrets
import socket
import struct
import time

from flask import current_app

from ..ops import metrics

log = logging.getLogger(__name__)

PORT = 53
FALLBACK = ["1.1.1.1"]
PROBE_TIMEOUT = 1.0
# /health is polled often (load balancers, the read-path benchmark); one
# probe per worker per this many seconds keeps it cheap.
PROBE_TTL = 2.0
# Unbound answers "localhost." itself (a default local zone), so the probe
# needs no upstream: it asks whether the resolver is there, not the internet.
PROBE_NAME = "localhost."
_A, _IN = 1, 1


def client_dns(config, gateway6=None):
    """The `dns` of a connect response: ORBMESH_DNS when set (as it is), else our resolver first when it
    runs (the IPv4 gateway, then `gateway6` for a client that has IPv6), then FALLBACK."""
    if config["DNS"] is not None:
        return config["DNS"]
    if config["DNS_RESOLVER"] != "on":
        return list(FALLBACK)
    return [config["GATEWAY"]] + ([gateway6] if gateway6 else []) + FALLBACK


def _query(name, ident):
    labels = b"".join(bytes([len(part)]) + part.encode("ascii") for part in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", _A, _IN)


def probe(address, port=PORT, timeout=PROBE_TIMEOUT):
    """None when the resolver at address:port answers a query for PROBE_NAME, else why not.

    Sent from `address` itself: the gateway is inside the pool, the only
    sources Unbound answers.
    """
    ident = secrets.randbelow(0x10000)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.bind((address, 0))
            sock.connect((address, port))
            sock.send(_query(PROBE_NAME, ident))
            deadline = time.monotonic() + timeout
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                reply = sock.recv(512)
                if len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == ident:
                    break
    except socket.timeout:
        return "no answer within %gs" % timeout
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    flags, _, answers = struct.unpack("!HHH", reply[2:8])
    if not flags & 0x8000 or flags & 0x000F:
        return "answered with rcode %d" % (flags & 0x000F)
    return None if answers else "answered with no records"


class Probe:
    """probe() of one resolver, its result kept for PROBE_TTL seconds; failures counted."""

    def __init__(self, address, port=PORT, ttl=PROBE_TTL, timeout=PROBE_TIMEOUT):
        self.address, self.port, self.ttl, self.timeout = address, port, ttl, timeout
        self._checked_at, self._error = None, None

    def error(self):
        now = time.monotonic()
        if self._checked_at is None or now - self._checked_at >= self.ttl:
            self._error = probe(self.address, self.port, self.timeout)
            self._checked_at = time.monotonic()
            if self._error:
                metrics.DNS_PROBE_FAILURES.inc()
                log.warning("dns resolver %s:%d: %s", self.address, self.port, self._error)
        return self._error


def health():
    """The `resolver` block of /health: whether the gateway's resolver answers (None when it is off)."""
    resolver = current_app.extensions.get("orbmesh_resolver")
    if resolver is None:
        return {"enabled": False}
    error = resolver.error()
    block = {"enabled": True, "address": resolver.address, "ok": error is None}
    if error:
        block["error"] = error
    return block


def init_app(app):
    on = app.config["DNS_RESOLVER"] == "on"
    app.extensions["orbmesh_resolver"] = Probe(app.config["GATEWAY"]) if on else None
