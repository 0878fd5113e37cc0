"""Client of the root helper's socket (see wghelper/protocol.py for the frames).

Connections are kept and reused: a new one costs the helper a thread and a
credentials check, and the app a connect and a close, which together were
a fifth of a connect's CPU (bench/control_plane.py).  At most MAX_OPEN are
open per process; more calls wait for one, so that every instance together
stays under the helper's ORBMESH_HELPER_MAX_CONNECTIONS.  A connection goes back
to the pool only after a complete answer, so a late reply can never be read
as the answer to the next request; one the helper has closed (restart, idle
timeout) is noticed before reuse.  Under gevent the socket calls yield to
other requests.
"""
import ipaddress
import itertools
import logging
import os
import select
import socket
import threading

from flask import current_app

from wghelper import protocol
from wghelper.settings import IPV6_FORWARD, IPV6_OFF, address6

from .failures import HelperFailed, HelperUnavailable  # noqa: F401 (importers ask the helper's module)
from .ops.metrics import timed_helper_call

log = logging.getLogger(__name__)

# Full syncs of large pools take longer than a single peer change.
SYNC_TIMEOUT = 120.0
# Peers per page of a walk through a dump (dump_pages).  The whole dump of 60,000 peers was a 13 MB answer
# that one worker decoded at once (72 ms, 54 MB at its peak), its requests waiting, and its RSS 12-22 MB
# higher after (docs/benchmarks.md); a page of 2,000 is 0.4 MB and 3-4 ms.
DUMP_PAGE = 2000


class Addressing:
    """The helper's pools, as its hello announces them (the unique-local pool6 is made and kept by the helper).

    One row, two addresses: a peer's IPv6 address is pool6's network
    address plus the offset its IPv4 address has in the pool.  Clients get
    it only in ipv6 mode "forward" (wghelper/ipv6.py): in mode "local" the
    node cannot forward their IPv6, and a client without an IPv6 address
    uses IPv4 rather than an IPv6 that vanishes, so every peer is as with
    IPv6 off.  A hello without a mode (a helper older than the modes) is
    "forward".
    """

    def __init__(self, hello):
        announced = hello.get("pool6")
        self.mode = hello.get("ipv6") or (IPV6_FORWARD if announced else IPV6_OFF)
        self.pool6 = ipaddress.IPv6Network(announced) if announced and self.mode == IPV6_FORWARD else None
        self.pool = ipaddress.IPv4Network(hello["pool"]) if self.pool6 else None
        self.gateway6 = hello.get("gateway6") if self.pool6 else None

    def ip6(self, address):
        """The /128 of the IPv4 `address` (str or int), or None while IPv6 is off."""
        if self.pool6 is None:
            return None
        if isinstance(address, int):
            # address6() by integers, printed by inet_ntop as wg prints it: the ipaddress objects took
            # 85 us a peer, 5 s for a sync of 60,000 in a gevent worker that served nothing meanwhile.
            offset = int(self.pool6.network_address) - int(self.pool.network_address)
            return socket.inet_ntop(socket.AF_INET6, (offset + address).to_bytes(16, "big")) + "/128"
        return "%s/128" % address6(self.pool, self.pool6, ipaddress.IPv4Address(address))

    def of(self, peer):
        """The peer's /128; None for a bridged peer too: see peer_spec."""
        return None if peer.mode == "bridge" else self.ip6(peer.addr)


def peer_spec(peer, addressing=None):
    """A store.Peer as the helper's apply_peers and sync_peers take it.

    A direct peer gets its /128 beside its /32 when IPv6 is on.  A bridged
    peer gets none: WireGuard drops every packet whose source is outside a
    peer's allowed IPs, so a bridged client's IPv6 ends on this interface
    and never leaves the entry directly (bridges carry IPv4 only).
    """
    ip6 = addressing.of(peer) if addressing else None
    return {"public_key": peer.public_key, "allowed_ips": [peer.address + "/32"] + ([ip6] if ip6 else []),
            "endpoint": peer.endpoint, "keepalive": peer.keepalive}


def sync_spec(peer, addressing=None):
    """peer_spec plus the peer's last endpoint: used only if the interface lost the peer (wghelper/peers.py)."""
    spec = peer_spec(peer, addressing)
    if peer.last_endpoint:
        spec["last_endpoint"] = peer.last_endpoint
    return spec


class Said:
    """What the helper said in its hello, kept in one place: its keys, pools and IPv6 mode.

    One cache and one refresh: the first question asks once (`hello()`),
    and every later hello (this client's own, or the reconcile watcher's,
    passed on with `learn`: a helper restarted in another ipv6 mode has a
    new generation, which only the watcher asks for) replaces it whole.
    The key and the addresses never change while a helper runs, so a
    connect reads them from here and asks nothing.
    """
    _said = None
    _addressing = None

    def learn(self, hello):
        self._said = hello
        self._addressing = Addressing(hello)

    def said(self):
        """The last hello; asked once when there was none."""
        if self._said is None:
            self.learn(self.hello())
        return self._said

    def addressing(self):
        """The helper's pools (Addressing)."""
        self.said()
        return self._addressing

    def server_key(self):
        return self.said()["public_key"]

    def own_keys(self):
        """The helper's public keys (server and bridge), which no peer may use (root refuses them too)."""
        return own_keys(self.said())

    def bridge_key(self):
        """The bridge key's public half, or None: a helper without one is asked again each time."""
        return self.said().get("bridge_public_key") or self.hello().get("bridge_public_key")


class HelperClient(Said):
    # Connections per process, open or kept idle (gevent patches the semaphore
    # below).  Not fewer: the helper merges the changes of the calls that
    # wait together into one `wg set`, so calls held back here cost more wg
    # runs; at 8, saturation at 10,000 peers fell from about 600 to about
    # 400 connects/s (bench/control_plane.py, docs/benchmarks.md).
    MAX_OPEN = 32

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._idle = []
        self._pid = os.getpid()
        self._open = threading.BoundedSemaphore(self.MAX_OPEN)

    def _take(self):
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            self._idle, self._pid = [], os.getpid()
        while self._idle:
            conn = self._idle.pop()
            if _still_open(conn[0]):
                return conn
            conn[0].close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock, sock.makefile("rb")

    def _give(self, conn):
        if self._pid == os.getpid():
            self._idle.append(conn)
        else:
            conn[1].close()
            conn[0].close()

    def close(self):
        while self._idle:
            sock, stream = self._idle.pop()
            stream.close()
            sock.close()

    @timed_helper_call
    def call(self, cmd, args=None, timeout=None):
        if not self._open.acquire(timeout=timeout or self.timeout):
            log.warning("helper %s: all %d connections busy", cmd, self.MAX_OPEN)
            raise HelperUnavailable()
        try:
            return self._call(cmd, args, timeout)
        finally:
            self._open.release()

    def _call(self, cmd, args, timeout):
        req_id = next(self._ids)
        frame = protocol.encode({"id": req_id, "cmd": cmd, "args": args or {}})
        conn = None
        try:
            conn = self._take()
            conn[0].settimeout(timeout or self.timeout)
            conn[0].sendall(frame)
            line = protocol.read_frame(conn[1])
        except (OSError, protocol.ProtocolError) as exc:
            log.warning("helper %s failed: %s", cmd, exc.__class__.__name__)
            if conn is not None:
                conn[1].close()
                conn[0].close()
            raise HelperUnavailable() from None
        if line is None:
            conn[1].close()
            conn[0].close()
            raise HelperUnavailable()
        self._give(conn)
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
        """Ask the helper now (its generation, whether it runs) and keep the answer as what it said."""
        result = self.call("hello")
        self.learn(result)
        return result

    def status(self):
        return self.call("status")

    def apply(self, add=(), remove=()):
        """Put the peers `add` (store.Peer) on the interface and take the public keys `remove` off."""
        addressing = self.addressing() if add else None
        return self.call("apply_peers", {"add": [peer_spec(p, addressing) for p in add], "remove": list(remove)})

    def dump_pages(self, limit=None):
        """The interface's peers by key, `limit` (DUMP_PAGE) at a time, from one dump the helper keeps for
        the walk (wghelper/peers.py Pages): yields (peers, through), `through` the page's last key, None
        on the last page (which covers every key after the one before)."""
        limit = limit or DUMP_PAGE
        page, offset = self.call("dump_peers", {"limit": limit}, timeout=SYNC_TIMEOUT), 0
        while True:
            offset += len(page["peers"])
            if offset >= page["total"] or not page["peers"]:
                yield page["peers"], None
                return
            yield page["peers"], page["peers"][-1]["public_key"]
            page = self.call("dump_peers", {"dump": page["dump"], "offset": offset, "limit": limit})

    def sync(self, peers, since=None):
        """Make the interface hold exactly `peers` (store.Peer), as read at `since` (time.monotonic()):
        what a connect or disconnect applied after that stays.  The result's "endpoints" are where the
        interface saw each peer."""
        addressing = self.addressing()
        args = {"peers": [sync_spec(p, addressing) for p in peers]}
        if since is not None:
            args["since"] = since
        return self.call("sync_peers", args, timeout=SYNC_TIMEOUT)

    # Bridge mode (wghelper/bridge.py); the helper names interfaces and tables.

    def bridge_up(self, slot, public_key, endpoint, address, keepalive):
        return self.call("bridge_up", {"slot": slot, "public_key": public_key, "endpoint": endpoint,
                                       "address": address, "keepalive": keepalive})

    def bridge_down(self, slot):
        return self.call("bridge_down", {"slot": slot})

    def bridge_rules(self, add=(), remove=(), exclusive=False):
        return self.call("bridge_rules", {"add": list(add), "remove": list(remove), "exclusive": exclusive},
                         timeout=SYNC_TIMEOUT if exclusive else None)

    # Usage, speed tiers and quotas (app/peers/usage.py, wghelper/limits.py, wghelper/usage.py).

    def limits(self, users, replace=False):
        """The tiers and quotas of `users` (the helper's entries), or with `replace` of every user."""
        return self.call("limits", {"users": list(users), "replace": replace},
                         timeout=SYNC_TIMEOUT if replace else None)

    def usage(self, since=None, fresh=False):
        """Per-peer counters that moved after the sample `since` ({"boot", "taken_at"}; None: all)."""
        return self.call("usage", {"since": since, "fresh": fresh}, timeout=SYNC_TIMEOUT)


def get_helper():
    return current_app.extensions["orbmesh_helper"]


def own_keys(hello):
    """The public keys (server and bridge) a `hello` names."""
    return frozenset(k for k in (hello.get("public_key"), hello.get("bridge_public_key")) if k)


def init_app(app):
    app.extensions["orbmesh_helper"] = HelperClient(app.config["HELPER_SOCKET"], app.config["HELPER_TIMEOUT"])


def _still_open(sock):
    """An idle connection has nothing to read; if it has, the helper closed it (or is out of step)."""
    # poll, not select(): a worker holding thousands of tunnel sessions hands
    # out descriptors past select()'s limit of 1,024.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)
