"""Bridge (multi-hop) mode, the app's half: which exit a connect goes to,
opening the tunnel to it, keeping tunnels and rules right, closing idle ones.
The connect itself, with its client's rule, is peers.connect_device.

The helper does the kernel work (wghelper/bridge.py) for a *slot*; the
``bridges`` table maps each exit in use to its slot.  A tunnel is opened by
registering this server on the exit through the exit's own API (add-peer
with the exit's API key from the registry, at ``bridgeAddress``; add-peer is
idempotent, so every bridged connect repeats it and so learns whether the
exit answers) and then asking the helper for ``bridge_up``.

On every exit this server is the user ``bridge_user(bridge key)``: derived
from its own bridge key, so two entries never share a user, and an exit can
give each entry a key scoped to that user (SCOPED_API_KEYS there).  Calls to
an exit are never made inside a database transaction: a slow exit must not
hold the write lock that every connect needs.
"""
import base64
import logging
import time

from flask import current_app

from wghelper.protocol import MAX_BRIDGE_SLOTS as MAX_SLOTS

from ..failures import BridgeLimit, BridgeUnavailable, ExitNotFound
from ..helper import HelperFailed, HelperUnavailable
from ..ops.logs import client_address
from ..peers import store
from ..peers.db import write
from . import smartconnect

log = logging.getLogger(__name__)
HELPER_ERRORS = (HelperUnavailable, HelperFailed)


def bridge_public_key(helper):
    """This server's bridge key (public half; the helper keeps the private one), as its hello says."""
    key = helper.bridge_key()
    if not key:
        raise BridgeUnavailable("The WireGuard helper has no bridge key")
    return key


def bridge_user(public_key):
    """The userUuid this server registers under on exits: its bridge public key, in hex."""
    return "orbmesh-bridge-" + base64.b64decode(public_key).hex()


def bridge_keepalive(config):
    # The entry starts every session, so it keeps the exit's NAT state open.
    return config["KEEPALIVE"] or 25


class Bridges:
    max_slots = MAX_SLOTS  # tunnels the helper can hold, one interface and routing table each

    def __init__(self, config, registry, client, policy):
        self.config = config
        self.registry = registry
        self.client = client
        self.policy = policy

    # --- one step of a connect (peers.connect_device) -------------------------

    def choose_exit(self, exit_id=None, force_direct=False):
        """(exit, recommended) for a connect: the exit asked for, else SmartConnect's pick, else (None, False).

        An unknown `exit_id` is EXIT_NOT_FOUND.  SmartConnect judges the
        client's address (app/ops/logs.py client_address), so it needs a request.
        """
        if exit_id:
            exit = self.registry.get(exit_id)
            if exit is None:
                raise ExitNotFound("No exit server with id %s" % exit_id)
            return exit, False
        if force_direct or not self.policy:
            return None, False
        exit = smartconnect.recommend(self.policy, client_address(), self.registry, self.client.healthy)
        return exit, exit is not None

    def admit(self, db, user_id, device_id, exit_id, current_exit=None):
        """Inside the connect's write transaction: BRIDGE_LIMIT when `exit_id` is one exit too many.

        A tunnel stays up BRIDGE_IDLE_GRACE seconds after its last client
        left, so a device naming a new exit on every connect would hold a
        slot for each and soon all of them.  So a device may use at most
        BRIDGE_EXITS_PER_DEVICE exits and a user BRIDGE_EXITS_PER_USER
        within the grace period: the exits they route through now and those
        they used or left within it (`current_exit` is the one this device
        is leaving, if any).  0 is no limit.
        """
        now = time.time()
        since = now - self.config["BRIDGE_IDLE_GRACE"]
        recent = store.recent_exits(db, user_id, since)
        device = recent.get(device_id, set())
        user = set().union(*recent.values())
        grace = self.config["BRIDGE_IDLE_GRACE"]
        for who, used, limit in (("device", device, self.config["BRIDGE_EXITS_PER_DEVICE"]),
                                 ("user", user, self.config["BRIDGE_EXITS_PER_USER"])):
            if limit and exit_id not in used and len(used) >= limit:
                raise BridgeLimit("This %s has used %d exit servers within %g s; connect through "
                                  "one of them, or directly, or retry later" % (who, len(used), grace))
        store.record_bridge_use(db, user_id, device_id, {exit_id, current_exit} - {None}, now, since)

    def open(self, helper, exit, slot):
        """Register this server on `exit`, then bring up the tunnel to it in `slot`.

        BRIDGE_UNAVAILABLE when the exit does not answer (app/bridge/exits.py).
        """
        key = bridge_public_key(helper)
        self.client.register(exit, bridge_user(key), key)
        helper.bridge_up(slot, exit["publicKey"], exit["endpoint"], exit["bridgeAddress"],
                         bridge_keepalive(self.config))

    # --- reconcile and the watcher -------------------------------------------

    def sync(self, db, helper):
        """Inside reconcile's lock: every exit in use has its tunnel, every bridged client its rule."""
        slots = {}
        for exit_id, slot, _, clients in store.bridge_rows(db):
            if not clients:
                continue  # sweep() takes it down after the grace period
            slots[exit_id] = slot
            exit = self.registry.exits.get(exit_id)
            try:
                if exit is None:
                    # Gone from the registry: no tunnel, and the rules below
                    # point at a table holding only the unreachable route.
                    log.warning("bridge: exit %s is not in the registry; its %d clients' traffic is dropped",
                                exit_id, clients)
                    helper.bridge_down(slot)
                else:
                    helper.bridge_up(slot, exit["publicKey"], exit["endpoint"], exit["bridgeAddress"],
                                     bridge_keepalive(self.config))
            except HELPER_ERRORS as exc:
                log.warning("bridge: cannot bring up the tunnel to %s: %s", exit_id, exc.message)
        rules = [{"address": p.address, "slot": slots[p.exit_id]}
                 for p in store.bridged_peers(db) if p.exit_id in slots]
        try:
            result = helper.bridge_rules(add=rules, exclusive=True)
        except HELPER_ERRORS as exc:
            # The peers are synced; the rules are tried again next round.
            log.warning("bridge: cannot sync the clients' rules: %s", exc.message)
            return
        if result.get("added") or result.get("removed"):
            log.info("bridge: rules synced, %s added, %s removed", result.get("added"), result.get("removed"))

    def tick(self, db, helper):
        """One watcher round: poll the registry, close tunnels idle past the grace period."""
        self.registry.refresh()
        now = time.time()
        for exit_id, slot, idle_since, clients in store.bridge_rows(db):
            if clients:
                continue
            if idle_since is None:
                with write(db):
                    store.mark_bridge_idle(db, exit_id, now)
            elif now - idle_since >= self.config["BRIDGE_IDLE_GRACE"]:
                self._close(db, helper, exit_id, slot)

    def _close(self, db, helper, exit_id, slot):
        """Take an idle tunnel down, then tell the exit (remove-peer for our own key only).

        The tunnel goes and its row is deleted under the write lock, so no
        connect can start using it meanwhile; the exit is told afterwards,
        outside any transaction.  A connect that opens the tunnel again
        in between registers anew, and its add-peer may reach the exit
        before our remove-peer does: then we register once more.
        """
        with write(db):
            row = [r for r in store.bridge_rows(db) if r[0] == exit_id]
            if not row or row[0][3] or row[0][2] is None:
                return
            helper.bridge_down(slot)
            store.delete_bridge(db, exit_id)
        log.info("bridge: tunnel to %s closed after %gs without clients", exit_id,
                 self.config["BRIDGE_IDLE_GRACE"])
        exit = self.registry.exits.get(exit_id)
        if exit is None:
            return
        key = bridge_public_key(helper)
        try:
            self.client.unregister(exit, bridge_user(key), key)
        except BridgeUnavailable:
            log.warning("bridge: could not unregister from exit %s; it keeps an idle peer", exit_id)
        if any(r[0] == exit_id for r in store.bridge_rows(db)):
            try:
                self.client.register(exit, bridge_user(key), key)
            except BridgeUnavailable:
                log.warning("bridge: exit %s reopened but not answering; the next connect registers", exit_id)


def get_bridges():
    return current_app.extensions["orbmesh_bridges"]


def init_app(app):
    app.extensions["orbmesh_bridges"] = Bridges(
        app.config, app.extensions["orbmesh_exits"], app.extensions["orbmesh_exit_client"],
        app.extensions["orbmesh_smartconnect"])
