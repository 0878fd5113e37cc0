"""Logging: one JSON object per line, a request id, one access event per request.

Each line carries time (ISO 8601, UTC), level, logger, message, the
request_id when logged inside a request, and whatever was passed with
``extra=``.  The request id comes from a well-formed incoming X-Request-ID
(nginx can set it to $request_id) or is a fresh uuid4 hex; every response
echoes it.

Nothing here logs headers, tokens or bodies: the access event has method,
path (without the query string), status, duration and client address only.
"""
import datetime
import ipaddress
import json
import logging
import re
import sys
import time
import uuid

from flask import current_app, g, has_app_context, request

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
# A JWT (header.payload.signature, base64url of JSON objects): never written out.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

access_log = logging.getLogger("app.access")


def _request_id():
    if has_app_context():
        return g.get("request_id")
    return None


def _extras(record):
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _scrub(text):
    return _JWT.sub("[redacted-jwt]", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record):
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _scrub(record.getMessage()),
        }
        request_id = _request_id()
        if request_id:
            entry["request_id"] = request_id
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = _scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = _scrub(record.exc_text)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the request id and extra fields appended."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record):
        line = super().format(record)
        request_id = _request_id()
        tail = (["request_id=%s" % request_id] if request_id else []) + [
            "%s=%s" % item for item in _extras(record).items()]
        head, newline, rest = line.partition("\n")  # keep a traceback below the line
        return _scrub(" ".join([head] + tail) + newline + rest)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced)."""

    def __init__(self):
        logging.Handler.__init__(self)
        self._stream = None

    @property
    def stream(self):
        return self._stream or sys.stderr

    @stream.setter
    def stream(self, value):
        self._stream = value


def configure(level, fmt="json"):
    """Put one handler on the root logger (replacing ours from an earlier call)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "orbmesh", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.orbmesh = True
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _ip(text):
    try:
        ip = ipaddress.ip_address(text.strip())
    except (ValueError, AttributeError):
        return None
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip


def client_address():
    """The client: the socket peer, or X-Real-IP when the peer is a trusted proxy."""
    peer = request.remote_addr or ""
    peer_ip = _ip(peer)
    trusted = current_app.extensions["orbmesh_trusted_proxies"]
    if (peer_ip in trusted) if peer_ip is not None else (not peer and "unix" in trusted):
        real = _ip(request.headers.get("X-Real-IP", ""))
        if real is not None:
            return str(real)
    return str(peer_ip) if peer_ip is not None else peer


def _start():
    given = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    g.request_started = time.perf_counter()


def _finish(response):
    if "request_id" not in g:
        g.request_id = uuid.uuid4().hex
    response.headers[REQUEST_ID_HEADER] = g.request_id
    started = g.get("request_started")
    duration = round((time.perf_counter() - started) * 1000, 3) if started is not None else None
    access_log.info("%s %s %d", request.method, request.path, response.status_code,
                    extra={"method": request.method, "path": request.path, "status": response.status_code,
                           "duration_ms": duration, "client": client_address()})
    return response


def init_app(app):
    app.extensions["orbmesh_trusted_proxies"] = frozenset(
        a if a == "unix" else _ip(a) for a in app.config["TRUSTED_PROXIES"])
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request(_finish)
