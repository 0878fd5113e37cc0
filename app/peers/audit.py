"""The audit log: one JSON line per peer lifecycle event, append-only, rotated.

A line says what happened to which peer, who asked, when, and the request id:

    {"time": "...Z", "event": "connect", "actor": {"type": "device", "user": "u1", "device": "d1"},
     "request_id": "...", "peer": {"public_key": "...", "address": "10.8.0.2", "user": "u1",
     "device": "d1", "source": "client"}}

Actors: a device (from its token), an API key (named by ``key_id``, the first
8 hex digits of its SHA-256, never the key), or the service itself
(``system``: the stale-peer sweep, reconcile).  Nothing secret goes in:
public keys are public; tokens, API keys and private keys never reach this
module.

Every gunicorn worker appends to the same file.  Each line is written under
an exclusive flock on ``<path>.lock``: look at the size, rotate if the line
would pass AUDIT_MAX_BYTES (audit.log -> audit.log.1 -> ... -> .N, the oldest
dropped), then one write() on an O_APPEND descriptor.  A worker whose
descriptor still points at a file another worker rotated away sees the inode
change and reopens, so no line lands in a rotated file and none is split;
a short write (a full disk takes what fits) is cut off again.

A failed write (say, a full disk) is counted and the line goes to the app
log instead, and the request goes on: the peer change has already happened
and is in the database.
"""
import datetime
import fcntl
import hashlib
import json
import logging
import os
import threading

from flask import current_app, g, has_app_context, has_request_context, request

from ..ops import metrics

log = logging.getLogger(__name__)

OFF = "off"


def key_id(api_key):
    """A non-secret name for an API key: 8 hex digits of its SHA-256."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def peer_fields(peer):
    return {"public_key": peer.public_key, "address": peer.address, "user": peer.user_id,
            "device": peer.device_id, "source": peer.source}


SYSTEM = {"type": "system"}


def _actor():
    """Who made the current request (the views have checked the credentials by now)."""
    if not has_request_context():
        return SYSTEM
    device = g.get("device")
    if device:
        return {"type": "device", "user": device[0], "device": device[1]}
    given = request.headers.get("X-API-Key")
    if given:
        return {"type": "api_key", "key_id": key_id(given)}
    return SYSTEM


class AuditLog:
    def __init__(self, path, max_bytes, backups):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = None
        self._lock_fd = None
        self._local = threading.Lock()  # greenlets and threads of this process

    def write(self, event, actor=SYSTEM, request_id=None, peer=None, **details):
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
                 .replace("+00:00", "Z"), "event": event, "actor": actor}
        if request_id:
            entry["request_id"] = request_id
        if peer is not None:
            entry["peer"] = peer_fields(peer)
        entry.update(details)
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode()
        try:
            self._append(line)
        except OSError as exc:
            metrics.AUDIT_FAILURES.inc()
            # The line goes to the app log instead (journald, usually another disk).
            log.error("audit log write failed (%s); the event: %s", exc.strerror or exc, line.decode().strip())
            self._close()
            return False
        return True

    def _append(self, line):
        with self._local:
            if self._lock_fd is None:
                self._lock_fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                fd = self._current()
                size = os.fstat(fd).st_size
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                    fd = self._current()
                    size = os.fstat(fd).st_size
                written = os.write(fd, line)
                if written != len(line):
                    # A full disk takes what fits: cut it off again, or the
                    # next line would be glued to the torn one.
                    os.ftruncate(fd, size)
                    raise OSError(0, "short write (%d of %d bytes)" % (written, len(line)))
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _current(self):
        """The descriptor of the file now at self.path (reopened after another process rotated)."""
        if self._fd is not None:
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return self._fd
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return self._fd

    def _rotate(self):
        for index in range(self.backups - 1, 0, -1):
            older = "%s.%d" % (self.path, index)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (self.path, index + 1))
        os.replace(self.path, self.path + ".1")

    def _close(self):
        with self._local:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self):
        self._close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def from_config(config):
    """The AuditLog the settings ask for, or None when AUDIT_LOG is "off"."""
    path = config["AUDIT_LOG"]
    if not path or path.lower() == OFF:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return AuditLog(path, config["AUDIT_MAX_BYTES"], config["AUDIT_BACKUPS"])


def record(event, peer=None, **details):
    """Audit an event of the current request (a no-op outside an app or with the log off)."""
    if not has_app_context():
        return
    audit = current_app.extensions.get("orbmesh_audit")
    if audit is not None:
        audit.write(event, _actor(), g.get("request_id"), peer, **details)


def init_app(app):
    app.extensions["orbmesh_audit"] = from_config(app.config)
