"""UDP probes for the client relay: POST /wireguard/probe, and the echo on ORBMESH_PROBE_PORT.

`orbmesh-relay --transport auto` must know that UDP to this node works
both ways before it sends a client's WireGuard datagrams over it again
(docs/tunnel-protocol.md, "Is UDP back?").  It asks this echo, from the
socket it would use for WireGuard, with the ticket and key this endpoint
handed out; the wire format and its checks are orbmesh_relay/probe.py.

Every worker (every gunicorn instance) binds the same UDP port with
SO_REUSEPORT and the kernel spreads probes over them; the key behind every
ticket comes from one secret in ORBMESH_PROBE_KEY_FILE that all of them
read, so any of them can answer any probe.  A worker starts its echo with
the first ticket it hands out: workers that never saw a relay (and the
unit tests' apps) hold no socket.  The echo answers with at most the
bytes it got, only to probes with a good MAC, so it is neither an
amplifier nor an open reflector.
"""
import base64
import errno
import logging
import os
import socket
import threading
import time

import gevent
import gevent.monkey
from flask import Blueprint, current_app

from orbmesh_relay import probe

from ..ops import shutdown
from . import ratelimit
from .auth import device_token_required
from .errors import ApiError
from .schemas import EmptySchema, load_body

log = logging.getLogger(__name__)
bp = Blueprint("probe", __name__, url_prefix="/wireguard")
empty_schema = EmptySchema()
SECRET_BYTES = 32


def read_secret(path):
    """The probe secret in `path`, made (0600, whole or not at all) by whichever worker comes first."""
    try:
        with open(path, "rb") as handle:
            secret = handle.read()
        if len(secret) == SECRET_BYTES:
            return secret
    except FileNotFoundError:
        pass
    temporary = "%s.%d.%s" % (path, os.getpid(), os.urandom(4).hex())
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(SECRET_BYTES))
        try:
            os.link(temporary, path)  # fails if another worker's file is there: then that one counts
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)
    with open(path, "rb") as handle:
        secret = handle.read()
    if len(secret) != SECRET_BYTES:
        raise OSError(errno.EINVAL, "%s does not hold a %d-byte probe secret" % (path, SECRET_BYTES))
    return secret


class Echo:
    """The UDP echo of one worker: every address (IPv6 and IPv4) on the probe port."""

    def __init__(self, host, port, secret):
        self.secret = secret
        self.sock = self._bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.answered = self.refused = 0
        self.closed = False

    @staticmethod
    def _bind(host, port):
        """`host` "::" is every address, IPv6 and IPv4 (IPv4 alone where the host has no IPv6)."""
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            if host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            if host != "::":
                raise
            sock, host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "0.0.0.0"
        address = (host, port)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return sock

    def serve(self):
        while not self.closed:
            try:
                data, source = self.sock.recvfrom(probe.SIZE + 1)
            except OSError:
                if self.closed:
                    return
                continue
            reply = probe.answer(data, source, self.secret)
            if reply is None:
                self.refused += 1
                continue
            try:
                self.sock.sendto(reply, source)
                self.answered += 1
            except OSError as exc:
                log.debug("probe reply to %s failed: %s", source[0], exc)

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _start(target):
    """A bare greenlet under gunicorn's gevent worker, else (a dev server, tests) a thread."""
    if gevent.monkey.is_module_patched("socket"):
        gevent.spawn(target)
    else:
        threading.Thread(target=target, name="probe-echo", daemon=True).start()


def echo():
    """This worker's echo, started on first use."""
    state = current_app.extensions["orbmesh_probe"]
    with state["lock"]:
        if state["echo"] is None:
            config = current_app.config
            running = Echo(config["PROBE_HOST"], config["PROBE_PORT"], read_secret(config["PROBE_KEY_FILE"]))
            shutdown.track(running)
            _start(running.serve)
            state["echo"] = running
            log.info("probe echo listening on udp port %d", running.port)
        return state["echo"]


@bp.post("/probe")
@device_token_required
@ratelimit.limited("tunnel")
def ticket():
    """A probe ticket and key for this device (the relay's "is UDP back?"); the echo is on from now."""
    load_body(empty_schema)
    if not current_app.config["PROBE_PORT"]:
        raise ApiError("NOT_FOUND", "UDP probes are off on this server")
    try:
        running = echo()
    except OSError as exc:
        log.error("probe echo cannot start on udp port %d: %s", current_app.config["PROBE_PORT"], exc.strerror)
        raise ApiError("NOT_FOUND", "UDP probes are not available on this server") from None
    now = time.time()
    ticket_bytes, key = probe.new_ticket(running.secret, now)
    return {"success": True, "port": running.port, "ticket": base64.b64encode(ticket_bytes).decode(),
            "key": base64.b64encode(key).decode(), "expiresIn": probe.TICKET_TTL, "serverTime": round(now, 3)}


def init_app(app):
    app.extensions["orbmesh_probe"] = {"lock": threading.Lock(), "echo": None}
    app.register_blueprint(bp)
