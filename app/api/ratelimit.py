"""Per-device rate limits on connect and on new tunnel sessions.

A fixed window per (action, user, device): at most LIMIT hits in each
RATE_LIMIT_WINDOW seconds.  Every response to a counted request carries

    X-RateLimit-Limit      hits allowed per window
    X-RateLimit-Remaining  hits left in the current window
    X-RateLimit-Reset      seconds until the window ends (and the count restarts)

and a refused one is 429 RATE_LIMITED with Retry-After (same value as Reset).

Counts live in the worker process, in memory: a dict lookup under a lock,
no database write on the connect path.  That is exact for the documented
deployment (one gevent worker per instance, nginx hashing on the device
token, however Authorization spells it, so all of a device's requests meet
the same counter); with N workers behind
one port a device could get up to N times the limit.
"""
import functools
import math
import threading
import time

from flask import current_app, g

from .errors import ApiError

ACTIONS = {"connect": "CONNECT_RATE_LIMIT", "tunnel": "TUNNEL_RATE_LIMIT"}


class FixedWindow:
    """Counts hits per key in fixed windows of `window` seconds."""

    def __init__(self, limit, window, clock=time.monotonic):
        self.limit = limit
        self.window = window
        self.clock = clock
        self._windows = {}  # key -> [window start, hits]
        self._lock = threading.Lock()
        self._next_sweep = clock() + window

    def hit(self, key):
        """Count one hit; return (allowed, remaining, reset_seconds)."""
        now = self.clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            entry = self._windows.get(key)
            if entry is None or now - entry[0] >= self.window:
                entry = self._windows[key] = [now, 0]
            allowed = entry[1] < self.limit
            if allowed:
                entry[1] += 1
            reset = max(1, math.ceil(entry[0] + self.window - now))
            return allowed, self.limit - entry[1], reset

    def _sweep(self, now):
        # Finished windows hold nothing worth keeping; dropping them bounds
        # memory by the devices seen in one window.
        self._windows = {k: v for k, v in self._windows.items() if now - v[0] < self.window}
        self._next_sweep = now + self.window

    def __len__(self):
        return len(self._windows)


def check(action):
    """Count one `action` for the device on g.device; raise RATE_LIMITED when over.

    A no-op when the action's limit is 0 (off).
    """
    limiter = current_app.extensions["orbmesh_rate_limits"].get(action)
    if limiter is None:
        return
    allowed, remaining, reset = limiter.hit((action,) + tuple(g.device))
    g.rate_limit = (limiter.limit, remaining, reset, allowed)
    if not allowed:
        raise ApiError("RATE_LIMITED", "Too many %s requests for this device; retry in %d s" % (action, reset))


def limited(action):
    """View decorator: check(action) before the view (after authentication)."""
    def decorate(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            check(action)
            return view(*args, **kwargs)
        return wrapped
    return decorate


def headers():
    """The X-RateLimit-* (and Retry-After) headers for this request's check, as a list."""
    state = g.get("rate_limit")
    if state is None:
        return []
    limit, remaining, reset, allowed = state
    out = [("X-RateLimit-Limit", str(limit)), ("X-RateLimit-Remaining", str(remaining)),
           ("X-RateLimit-Reset", str(reset))]
    return out if allowed else out + [("Retry-After", str(reset))]


def _add_headers(response):
    for name, value in headers():
        response.headers[name] = value
    return response


def init_app(app):
    window = app.config["RATE_LIMIT_WINDOW"]
    app.extensions["orbmesh_rate_limits"] = {
        action: FixedWindow(app.config[name], window) for action, name in ACTIONS.items() if app.config[name]}
    app.after_request(_add_headers)
