"""Bridge (multi-hop) mode, the app's half: which exit a connect goes to,
opening the tunnel to it, keeping tunnels and rules right, closing idle ones.

The helper does the kernel work (wghelper/bridge.py) for a *slot*; the
``bridges`` table maps each exit in use to its slot.  A tunnel is opened by
registering this server on the exit through the exit's own API (add-peer
with the exit's API key from the registry, at ``bridgeAddress``; add-peer is
idempotent, so every bridged connect repeats it and so learns whether the
exit answers) and then asking the helper for ``bridge_up``.
"""
import logging
import time

from flask import current_app

from wghelper.protocol import MAX_BRIDGE_SLOTS as MAX_SLOTS

from . import peers, smartconnect, store
from .errors import ApiError
from .helper import HelperFailed, HelperUnavailable
from .logs import client_address

log = logging.getLogger(__name__)
HELPER_ERRORS = (HelperUnavailable, HelperFailed)


def bridge_public_key(helper, cache):
    """This server's bridge key (public half; the helper keeps the private one)."""
    if not cache.get("bridge"):
        key = helper.hello().get("bridge_public_key")
        if not key:
            raise ApiError("BRIDGE_UNAVAILABLE", "The WireGuard helper has no bridge key")
        cache["bridge"] = key
    return cache["bridge"]


def bridge_keepalive(config):
    # The entry starts every session, so it keeps the exit's NAT state open.
    return config["KEEPALIVE"] or 25


class Route:
    """A connect that goes through the tunnel to `exit` (see peers.connect_device)."""

    max_slots = MAX_SLOTS

    def __init__(self, bridges, helper, exit, recommended=False):
        self.bridges = bridges
        self.helper = helper
        self.exit = exit
        self.exit_id = exit["id"]
        self.recommended = recommended

    def open(self, slot):
        b = self.bridges
        key = bridge_public_key(self.helper, b.key_cache)
        b.client.register(self.exit, b.config["BRIDGE_USER"], key)
        self.helper.bridge_up(slot, self.exit["publicKey"], self.exit["endpoint"],
                              self.exit["bridgeAddress"], bridge_keepalive(b.config))


class Bridges:
    def __init__(self, config, registry, client, policy, key_cache):
        self.config = config
        self.registry = registry
        self.client = client
        self.policy = policy
        self.key_cache = key_cache

    def route_for(self, data, helper):
        """The Route for a connect body, or None for direct; EXIT_NOT_FOUND for an unknown exit."""
        exit_id = data.get("exitServerId")
        if exit_id:
            exit = self.registry.get(exit_id)
            if exit is None:
                raise ApiError("EXIT_NOT_FOUND", "No exit server with id %s" % exit_id)
            return Route(self, helper, exit)
        if data.get("force_direct") or not self.policy:
            return None
        exit = smartconnect.recommend(self.policy, client_address(), self.registry, self.client.healthy)
        return Route(self, helper, exit, recommended=True) if exit else None

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
                with store.write(db):
                    store.mark_bridge_idle(db, exit_id, now)
            elif now - idle_since >= self.config["BRIDGE_IDLE_GRACE"]:
                self._close(db, helper, exit_id, slot)

    def _close(self, db, helper, exit_id, slot):
        # Under the write lock, so no connect can start using the tunnel meanwhile.
        with store.write(db):
            row = [r for r in store.bridge_rows(db) if r[0] == exit_id]
            if not row or row[0][3] or row[0][2] is None:
                return
            helper.bridge_down(slot)
            exit = self.registry.exits.get(exit_id)
            if exit is not None:
                try:
                    self.client.unregister(exit, self.config["BRIDGE_USER"])
                except ApiError:
                    log.warning("bridge: could not unregister from exit %s; it keeps an idle peer", exit_id)
            store.delete_bridge(db, exit_id)
        log.info("bridge: tunnel to %s closed after %gs without clients", exit_id,
                 self.config["BRIDGE_IDLE_GRACE"])


def connect(db, helper, allocator, device, public_key, route, max_devices=0):
    """peers.connect_device along `route`; returns (peer, the route taken).

    When SmartConnect only recommended the bridge and the exit fails, the
    client gets a direct tunnel: a direct tunnel beats none.
    """
    try:
        return peers.connect_device(db, helper, allocator, *device, public_key, bridge=route,
                                    max_devices=max_devices), route
    except ApiError as exc:
        if not (route and route.recommended and exc.code == "BRIDGE_UNAVAILABLE"):
            raise
    log.warning("smartconnect: exit %s unavailable, connecting directly", route.exit_id)
    return peers.connect_device(db, helper, allocator, *device, public_key, max_devices=max_devices), None


def get_bridges():
    return current_app.extensions["orbmesh_bridges"]


def init_app(app):
    app.extensions["orbmesh_bridges"] = Bridges(
        app.config, app.extensions["orbmesh_exits"], app.extensions["orbmesh_exit_client"],
        app.extensions["orbmesh_smartconnect"], app.extensions["orbmesh_server_key"])
