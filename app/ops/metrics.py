"""Prometheus instruments: every counter, histogram and gauge the app updates.

Every metric is defined once, here; GET /metrics, which reads them, is
metrics_view.py.  Under gunicorn, set PROMETHEUS_MULTIPROC_DIR (an empty
directory, writable by the app) in the environment before the app starts:
prometheus_client then keeps each worker's values in files there, and a
scrape of any worker sums them all (MultiProcessCollector).  gunicorn must
call ``child_exit`` below when a worker dies so that its live gauges go
away:

    # deploy/gunicorn.conf.py
    from app.ops.metrics import child_exit  # noqa: F401

Without the variable (tests, ``flask run``) the values live in this process.
"""
import functools
import os
import sqlite3
import time

from marshmallow import ValidationError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, multiprocess
from werkzeug.exceptions import HTTPException

from ..failures import Failure

# prometheus_client picks its value store when it is imported; this is the
# same test, made at the same time.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))

disable_created_metrics()  # no *_created series: they do not exist in multiprocess mode either
REGISTRY = CollectorRegistry()

# Results of the peer endpoints: "ok" or the error code in lower case, with
# malformed and oversized input folded into "invalid".
RESULTS = ("ok", "invalid", "unauthorized", "conflict", "not_found", "not_implemented", "pool_exhausted",
           "helper_unavailable", "helper_error", "database_unavailable", "internal_error", "quota_exceeded")
_RESULT_OF_CODE = {"VALIDATION_ERROR": "invalid", "PAYLOAD_TOO_LARGE": "invalid"}


def _results_counter(name, documentation):
    counter = Counter(name, documentation, ["result"], registry=REGISTRY)
    for result in RESULTS:
        counter.labels(result)  # every series exists from the start, at 0
    return counter


CONNECTS = _results_counter("orbmesh_connect_requests", "POST /wireguard/connect requests by result")
DISCONNECTS = _results_counter("orbmesh_disconnect_requests", "POST /wireguard/disconnect requests by result")
ADD_PEERS = _results_counter("orbmesh_add_peer_requests", "POST /wireguard/add-peer requests by result")
REMOVE_PEERS = _results_counter("orbmesh_remove_peer_requests", "POST /wireguard/remove-peer requests by result")

HELPER_LATENCY = Histogram(
    "orbmesh_helper_call_duration_seconds", "Round trip of one call to the root helper, by command",
    ["command"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120))

TRANSPORTS = ("ws", "http")
TUNNEL_SESSIONS = Gauge("orbmesh_tunnel_sessions", "Open tunnel sessions by transport", ["transport"],
                        registry=REGISTRY, multiprocess_mode="livesum")
TUNNEL_BYTES = Counter("orbmesh_tunnel_bytes", "WireGuard datagram bytes carried by the tunnels "
                       "(up: client to WireGuard, down: WireGuard to client)", ["transport", "direction"],
                       registry=REGISTRY)
TUNNEL_PACKETS = Counter("orbmesh_tunnel_packets", "WireGuard datagrams carried by the tunnels",
                         ["transport", "direction"], registry=REGISTRY)
DROP_REASONS = ("not_wireguard", "unreachable", "queue_full")
TUNNEL_DROPPED = Counter("orbmesh_tunnel_dropped_datagrams", "Tunnel datagrams dropped: not WireGuard, "
                         "WireGuard unreachable, downstream queue full (HTTP)",
                         ["transport", "reason"], registry=REGISTRY)
for _transport in TRANSPORTS:
    TUNNEL_SESSIONS.labels(_transport)
    for _direction in ("up", "down"):
        TUNNEL_BYTES.labels(_transport, _direction)
        TUNNEL_PACKETS.labels(_transport, _direction)
    for _reason in DROP_REASONS:
        TUNNEL_DROPPED.labels(_transport, _reason)

SWEEP_ACTIONS = ("quarantined", "freed", "released")
SWEPT_PEERS = Counter("orbmesh_stale_peers", "Stale-peer sweep: client peers quarantined (taken off the "
                      "interface), freed (address released) or released (reconnected during quarantine)",
                      ["action"], registry=REGISTRY)
for _action in SWEEP_ACTIONS:
    SWEPT_PEERS.labels(_action)
AUDIT_FAILURES = Counter("orbmesh_audit_write_failures", "Audit log lines that could not be written",
                         registry=REGISTRY)
LIMITS = _results_counter("orbmesh_limits_requests", "POST /wireguard/limits requests by result")
USAGE_TRANSPORTS = ("udp", "ws", "http")
USAGE_BYTES = Counter("orbmesh_usage_bytes", "Bytes counted as usage from the interface's per-peer counters, by the "
                      "transport the peer used (up: client to node)", ["transport", "direction"], registry=REGISTRY)
for _transport in USAGE_TRANSPORTS:
    for _direction in ("up", "down"):
        USAGE_BYTES.labels(_transport, _direction)
QUOTA_CUTS = Counter("orbmesh_quota_cuts", "Users whose peers left the interface because their usage reached "
                     "the quota", registry=REGISTRY)
QUOTA_FAILURES = Counter("orbmesh_quota_enforcement_failures", "Quota cuts that failed (the helper refused or "
                         "did not answer); retried at the next count", registry=REGISTRY)
DNS_PROBE_FAILURES = Counter("orbmesh_dns_probe_failures", "Probes of the node's DNS resolver (on the gateway) "
                             "that got no good answer", registry=REGISTRY)


def result_of(exc):
    """The `result` label for an exception leaving a view."""
    if isinstance(exc, Failure):
        return _RESULT_OF_CODE.get(exc.code, exc.code.lower())
    if isinstance(exc, ValidationError):
        return "invalid"
    if isinstance(exc, HTTPException) and exc.code is not None and exc.code < 500:
        return "invalid"
    if isinstance(exc, sqlite3.Error):
        return "database_unavailable"
    return "internal_error"


def counted(counter):
    """Decorate a view: count each call in `counter` by result."""
    def decorate(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            try:
                response = view(*args, **kwargs)
            except Exception as exc:
                counter.labels(result_of(exc)).inc()
                raise
            counter.labels("ok").inc()
            return response
        return wrapped
    return decorate


def timed_helper_call(call):
    """Decorate HelperClient.call(cmd, ...): observe its duration by command."""
    @functools.wraps(call)
    def wrapped(self, cmd, *args, **kwargs):
        start = time.perf_counter()
        try:
            return call(self, cmd, *args, **kwargs)
        finally:
            HELPER_LATENCY.labels(cmd).observe(time.perf_counter() - start)
    return wrapped


def tunnel_session(transport):
    """Context manager or decorator: one open tunnel session while inside."""
    return TUNNEL_SESSIONS.labels(transport).track_inprogress()


class TunnelMeter:
    """The tunnel counters of one transport, bound once."""

    def __init__(self, transport):
        self.transport = transport
        self.sessions = TUNNEL_SESSIONS.labels(transport)
        self._up = (TUNNEL_PACKETS.labels(transport, "up"), TUNNEL_BYTES.labels(transport, "up"))
        self._down = (TUNNEL_PACKETS.labels(transport, "down"), TUNNEL_BYTES.labels(transport, "down"))

    # Counted per batch of datagrams, not per datagram: each inc() takes a lock.
    def up(self, size, packets=1):
        self._up[0].inc(packets)
        self._up[1].inc(size)

    def down(self, size, packets=1):
        self._down[0].inc(packets)
        self._down[1].inc(size)

    def dropped(self, reason, count=1):
        if count:
            TUNNEL_DROPPED.labels(self.transport, reason).inc(count)


@functools.lru_cache(maxsize=None)
def tunnel_meter(transport):
    return TunnelMeter(transport)


def _multiproc_dir():
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def child_exit(server, worker):
    """gunicorn hook (master process): drop the live gauges of a worker that exited."""
    path = _multiproc_dir()
    if path:
        multiprocess.mark_process_dead(worker.pid, path)
