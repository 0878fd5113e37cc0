"""Client of the root helper's socket (see wghelper/protocol.py for the frames).

One short connection per call: it costs tens of microseconds on a Unix
socket, needs no pool, and a helper restart never leaves a dead connection
behind in a worker.  Under gevent the socket calls yield to other requests.
"""
import itertools
import logging
import socket

from flask import current_app

from wghelper import protocol

from .errors import ApiError
from .metrics import timed_helper_call

log = logging.getLogger(__name__)

# Full syncs of large pools take longer than a single peer change.
SYNC_TIMEOUT = 120.0


class HelperUnavailable(ApiError):
    def __init__(self, message="WireGuard helper is unavailable"):
        super().__init__("HELPER_UNAVAILABLE", message)


class HelperFailed(ApiError):
    def __init__(self, error):
        details = {"helperCode": error.get("code")}
        if isinstance(error.get("details"), dict):
            details.update({k: v for k, v in error["details"].items() if k in ("command", "exit_code", "field")})
        super().__init__("HELPER_ERROR", "WireGuard helper failed: %s" % error.get("message", "unknown error"),
                         details)
        self.helper_code = error.get("code")


class HelperClient:
    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)

    @timed_helper_call
    def call(self, cmd, args=None, timeout=None):
        req_id = next(self._ids)
        frame = protocol.encode({"id": req_id, "cmd": cmd, "args": args or {}})
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout or self.timeout)
        try:
            sock.connect(self.path)
            sock.sendall(frame)
            with sock.makefile("rb") as stream:
                line = protocol.read_frame(stream)
        except (OSError, protocol.ProtocolError) as exc:
            log.warning("helper %s failed: %s", cmd, exc.__class__.__name__)
            raise HelperUnavailable() from None
        finally:
            sock.close()
        if line is None:
            raise HelperUnavailable()
        try:
            reply = protocol.decode(line)
        except protocol.ProtocolError:
            raise HelperUnavailable("WireGuard helper sent an unreadable reply") from None
        if not reply.get("ok"):
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            log.warning("helper %s refused: %s", cmd, error.get("code"))
            raise HelperFailed(error)
        return reply.get("result") or {}

    def hello(self):
        return self.call("hello")

    def status(self):
        return self.call("status")

    def apply(self, add=(), remove=()):
        return self.call("apply_peers", {"add": list(add), "remove": list(remove)})

    def dump(self):
        return self.call("dump_peers", timeout=SYNC_TIMEOUT)["peers"]

    def sync(self, peers):
        return self.call("sync_peers", {"peers": list(peers)}, timeout=SYNC_TIMEOUT)

    # Bridge mode (wghelper/bridge.py); the helper names interfaces and tables.

    def bridge_up(self, slot, public_key, endpoint, address, keepalive):
        return self.call("bridge_up", {"slot": slot, "public_key": public_key, "endpoint": endpoint,
                                       "address": address, "keepalive": keepalive})

    def bridge_down(self, slot):
        return self.call("bridge_down", {"slot": slot})

    def bridge_rules(self, add=(), remove=(), exclusive=False):
        return self.call("bridge_rules", {"add": list(add), "remove": list(remove), "exclusive": exclusive},
                         timeout=SYNC_TIMEOUT if exclusive else None)


def get_helper():
    return current_app.extensions["orbmesh_helper"]


def init_app(app):
    app.extensions["orbmesh_helper"] = HelperClient(app.config["HELPER_SOCKET"], app.config["HELPER_TIMEOUT"])
