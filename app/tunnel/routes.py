"""Blueprint: /wireguard/ws and /wireguard/tunnel, WireGuard over HTTPS.

Both relay datagrams between the client and our own WireGuard listen port on
loopback (docs/tunnel-protocol.md has the wire formats).  The device token
and the session cap are checked in before_request, so a refused WebSocket
upgrade gets a JSON error and never a 101.
"""
import logging
import re
import threading

import flask_sock
import gevent
import gevent.monkey
import simple_websocket
from flask import Blueprint, Response, current_app, g, request
from flask_sock import Sock
from werkzeug.routing import WebsocketMismatch

from orbmesh_relay.framing import BATCH_TYPE, MAX_DATAGRAM, SINGLE_TYPE, FramingError, decode_batch, encode_batch

from ..api import ratelimit
from ..api.auth import authenticate_device
from ..api.errors import ApiError, error_response
from ..ops import metrics, shutdown
from ..peers import usage
from ..peers.db import get_db
from .sessions import HttpSessions, SessionSlots, UdpPipe
from .wsconn import TunnelWebSocket

log = logging.getLogger(__name__)
bp = Blueprint("tunnel", __name__, url_prefix="/wireguard")
sock = Sock()
_SESSION_NAME = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")


def _slots():
    return current_app.extensions["orbmesh_tunnel_slots"]


@bp.before_request
def _authenticate():
    g.device = authenticate_device()
    shutdown.refuse_new()
    usage.refuse_cut(get_db(), g.device[0])
    if request.endpoint == "tunnel.ws":
        ratelimit.check("tunnel")
        _slots().acquire(g.device)
        g.tunnel_slot = g.device
        usage.note_tunnel(get_db(), *g.device, "ws")
        # The 101 is written by the WebSocket server, not by a Flask response.
        request.environ["orbmesh.handshake_headers"] = ratelimit.headers()


@bp.teardown_request
def _release(exc=None):
    device = g.pop("tunnel_slot", None)
    if device is not None:
        _slots().release(device)


@sock.route("/ws", bp=bp)
def ws(connection):
    """Hand the upgraded connection to a relay of its own; the request ends here."""
    config = current_app.config
    pipe = UdpPipe(config["TUNNEL_TARGET_HOST"], config["LISTEN_PORT"], "ws", lazy=True)
    session = connection.detach()
    # From here the relay holds the device's session slot, not the request.
    device = g.pop("tunnel_slot")
    args = (session, pipe, config["WS_IDLE_TIMEOUT"], _slots(), device)
    _start(_relay, *args)


def _start(target, *args):
    """A bare greenlet under gunicorn's gevent worker, else (a dev server) a thread.

    Measured in bench/memory.py: an idle session costs 3 kB less in a greenlet
    than in a gevent-patched Thread (its Events, locks and bookkeeping).
    """
    if gevent.monkey.is_module_patched("threading"):
        gevent.spawn(target, *args)
    else:
        threading.Thread(target=target, args=args, name="tunnel-ws", daemon=True).start()


def _relay(session, pipe, idle_timeout, slots, device):
    """Relay WireGuard datagrams both ways: one per binary message, or batches (orbmesh.batch.v1).

    Runs outside any request (a greenlet under gunicorn's gevent worker),
    so it gets what it needs as arguments and gives the slot back itself.
    """
    reason = "connection lost"
    try:
        with metrics.tunnel_session("ws"):
            shutdown.track(session)
            reason = session.serve(pipe, idle_timeout)
    except Exception:
        log.exception("tunnel ws session failed user=%s device=%s", *device)
    finally:
        pipe.close()
        slots.release(device)
        log.info("tunnel ws session end user=%s device=%s %s%s reason=%s", *device, pipe.counters.line(),
                 " batch" if session.batch else "", reason)


def _wait_seconds(config):
    raw = request.headers.get("X-Tunnel-Wait")
    if raw is None:
        return config["TUNNEL_HOLD"]
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= config["TUNNEL_HOLD"]:
        raise ApiError("VALIDATION_ERROR", "X-Tunnel-Wait must be 0 to %g seconds" % config["TUNNEL_HOLD"])
    return wait


def _datagrams(kind):
    body = request.get_data(cache=False)
    if kind == SINGLE_TYPE:
        if len(body) > MAX_DATAGRAM:
            raise ApiError("PAYLOAD_TOO_LARGE", "A datagram is at most %d bytes" % MAX_DATAGRAM)
        return [body] if body else []
    try:
        return decode_batch(body)
    except FramingError as exc:
        raise ApiError("VALIDATION_ERROR", "Broken batch framing: %s" % exc) from None


@bp.post("/tunnel")
def http_tunnel():
    """Send the body's datagrams to WireGuard; answer with what it sent back."""
    config = current_app.config
    kind = request.mimetype
    if kind not in (SINGLE_TYPE, BATCH_TYPE):
        raise ApiError("UNSUPPORTED_MEDIA_TYPE", "Content-Type must be %s or %s" % (SINGLE_TYPE, BATCH_TYPE))
    name = request.headers.get("X-Tunnel-Session", "default")
    if not _SESSION_NAME.match(name):
        raise ApiError("VALIDATION_ERROR", "X-Tunnel-Session must be 1-64 characters of A-Z a-z 0-9 _ -")
    wait = _wait_seconds(config)
    request.max_content_length = config["TUNNEL_MAX_BODY"]
    datagrams = _datagrams(kind)
    sessions = current_app.extensions["orbmesh_http_sessions"]
    session = sessions.get(g.device, name, on_new=lambda: _new_session("http"))
    session.pipe.send(datagrams)
    single = kind == SINGLE_TYPE
    out = sessions.take(session, wait, max_count=1 if single else None, max_bytes=config["TUNNEL_MAX_RESPONSE"])
    headers = {"X-Tunnel-Session": name, "Cache-Control": "no-store"}
    if single:
        if not out:
            return Response(status=204, headers=headers)
        return Response(out[0], mimetype=SINGLE_TYPE, headers=headers)
    return Response(encode_batch(out), mimetype=BATCH_TYPE, headers=headers)


def _new_session(transport):
    """A new HTTP session: counted against the rate limit, and the device's transport noted (usage)."""
    ratelimit.check("tunnel")
    usage.note_tunnel(get_db(), *g.device, transport)


def _not_an_upgrade(exc):
    """A plain GET: routing refuses it before any of our code runs, so nothing is counted.

    The token is still checked first, so no credentials always means 401.
    """
    try:
        authenticate_device()
    except ApiError as error:
        return error_response(error.code, error.message)
    return error_response("VALIDATION_ERROR", "This endpoint needs a WebSocket upgrade (Upgrade: websocket)")


def _websockets_are_tunnel_websockets():
    """Make flask-sock build the /ws route's connections as TunnelWebSocket (wsconn.py).

    flask-sock 0.7 creates each connection with the name ``Server`` from its
    own module and has no option to choose the class; pointing that name at
    our subclass is the one seam it has, so it is set here, beside the route
    it serves.  The check makes an upgrade that changes this fail at start,
    not in production traffic.
    """
    if flask_sock.Server not in (simple_websocket.Server, TunnelWebSocket):
        raise RuntimeError("unexpected flask_sock.Server; re-check app/tunnel/wsconn.py against flask-sock")
    flask_sock.Server = TunnelWebSocket


def init_app(app):
    _websockets_are_tunnel_websockets()
    app.register_error_handler(WebsocketMismatch, _not_an_upgrade)
    slots = SessionSlots(app.config["TUNNEL_MAX_SESSIONS"])
    app.extensions["orbmesh_tunnel_slots"] = slots
    app.extensions["orbmesh_http_sessions"] = shutdown.track(HttpSessions(app.config, slots))
    app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": app.config["WS_PING_INTERVAL"],
                                         "max_message_size": MAX_DATAGRAM}
    sock.init_app(app)
