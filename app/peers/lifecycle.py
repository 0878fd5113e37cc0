"""Peer lifecycle: the database change and the interface change, as one.

Each operation commits its row first, then asks the helper; when the
helper fails, the row change is undone, so a failed call leaves nothing
allocated.  Rows go in before the helper call (not after) so a reconcile
that runs in between never strips a peer that a client is being told about.
A quarantined peer (see sweep.py) is off the interface but keeps its row
and address: its device connecting again gets that same address back.
"""
import ipaddress
import logging
import sqlite3
import time
from dataclasses import dataclass

from ..failures import BridgeLimit, BridgeUnavailable, Conflict, DeviceLimit, Failure, InvalidInput
from ..helper import HelperFailed, HelperUnavailable
from ..ops import metrics
from . import audit, reconcile, store, usage
from .db import undo, write

log = logging.getLogger(__name__)
HELPER_ERRORS = (HelperUnavailable, HelperFailed)


def _short(key):
    return key[:8] + "..."


# Said of a key the schema let through (its form is right) that this server holds itself.
OWN_KEY = "Must be a WireGuard key: base64 of exactly 32 bytes, not a low-order point nor this server's own key."


@dataclass(frozen=True)
class Ask:
    """One device's connect: who, with which key, under which caps (`plan`: the token's plan claims)."""
    user_id: str
    device_id: str
    public_key: str
    max_devices: int = 0
    plan: dict = None


@dataclass(frozen=True)
class Route:
    """Where the device's traffic goes: direct (no exit), or through the tunnel to `exit` (bridges opens it)."""
    exit: dict = None
    bridges: object = None

    @property
    def mode(self):
        return "bridge" if self.exit else "direct"

    @property
    def exit_id(self):
        return self.exit["id"] if self.exit else None


DIRECT = Route()


@dataclass(frozen=True)
class Claim:
    """What the claim step wrote: the device's row now (`peer`) and before (`previous`), and what it changed."""
    peer: object
    previous: object
    old_key: str
    quarantined_at: float
    limits: object
    slot: int = None
    new_bridge: str = None


def connect_device(db, helper, allocator, bridges, user_id, device_id, public_key, exit_id=None,
                   force_direct=False, max_devices=0, plan=None):
    """Give the device a peer with `public_key`; return the Peer on the interface.

    Its route first: through the tunnel to an exit when the connect asks
    for one (`exit_id`) or SmartConnect recommends one
    (bridges.choose_exit), else direct; the Peer's mode and exit_id say
    which.  When SmartConnect only recommended the exit and the exit fails,
    the client gets a direct tunnel: a direct tunnel beats none.  Then, on
    that route, claim (the row) and apply (the interface).
    """
    if public_key in helper.own_keys():  # from the hello the worker already holds: no helper call
        raise InvalidInput.field("publicKey", OWN_KEY)
    ask = Ask(user_id, device_id, public_key, max_devices, plan)
    exit, recommended = bridges.choose_exit(exit_id, force_direct)
    if exit is not None:
        try:
            return _connect(db, helper, allocator, ask, Route(exit, bridges))
        except (BridgeUnavailable, BridgeLimit):
            if not recommended:
                raise
        log.warning("smartconnect: exit %s unavailable, connecting directly", exit["id"])
    return _connect(db, helper, allocator, ask, DIRECT)


def _connect(db, helper, allocator, ask, route):
    """connect_device along one route: claim, apply, then what follows a connect that holds."""
    existing = store.by_device(db, ask.user_id, ask.device_id)
    if existing and existing.public_key != ask.public_key:
        usage.settle(db, helper, None, [existing])  # its key leaves the interface: count what it moved
    claim = _claim(db, allocator, ask, route)
    _apply(db, helper, claim, route)
    _connected(db, helper, ask, route, claim)
    return claim.peer


def _claim(db, allocator, ask, route):
    """The device's row, in one write transaction: key, quota, exit limits, device cap, address, bridge slot.

    The device cap is counted in the same transaction that would allocate,
    so concurrent connects cannot pass it together.  A quarantined peer
    (sweep.py) keeps its address and is released here.
    """
    with write(db):
        owner = store.by_key(db, ask.public_key)
        if owner and (owner.source != "client" or (owner.user_id, owner.device_id) != (ask.user_id, ask.device_id)):
            raise Conflict("This public key is already registered to another peer")
        limits = usage.admit(db, ask.user_id, ask.plan)
        current = store.by_device(db, ask.user_id, ask.device_id)
        if route.exit:
            route.bridges.admit(db, ask.user_id, ask.device_id, route.exit_id, current.exit_id if current else None)
        quarantined_at = current.quarantined_at if current else None
        if quarantined_at:
            store.set_quarantined(db, current.id, None)
        peer = _take_row(db, allocator, ask, route, current)
        slot = new_bridge = None
        if route.exit:
            slot, new_bridge = store.bridge_slot(db, route.exit_id, route.bridges.max_slots)
            if slot is None:
                raise BridgeUnavailable("This server has no free bridge slot")
    old_key = current.public_key if current and current.public_key != ask.public_key else None
    return Claim(peer, current, old_key, quarantined_at, limits, slot, route.exit_id if new_bridge else None)


def _take_row(db, allocator, ask, route, current):
    """The device's row with the asked key and route: its own, rekeyed or rerouted, or a new one at a free address."""
    if current:
        if current.public_key != ask.public_key:
            store.set_key(db, current.id, current.public_key, ask.public_key)
        if (current.mode, current.exit_id) != (route.mode, route.exit_id):
            store.set_route(db, current.id, route.mode, route.exit_id)
        return store.by_key(db, ask.public_key)
    if ask.max_devices and store.count_devices(db, ask.user_id) >= ask.max_devices:
        raise DeviceLimit("This user already has %d devices connected to this server; disconnect one first"
                          % ask.max_devices)
    return store.insert(db, {"public_key": ask.public_key, "addr": allocator.allocate(db), "user_id": ask.user_id,
                             "device_id": ask.device_id, "source": "client", "endpoint": None,
                             "keepalive": 0, "mode": route.mode, "exit_id": route.exit_id})


def _apply(db, helper, claim, route):
    """The claim on the interface; on any failure the row is undone and the error goes to the client.

    A bridged peer's rule is in place before the peer is on the interface,
    so a bridged client never sends a packet out directly.
    """
    peer, previous = claim.peer, claim.previous
    try:
        if route.exit:
            route.bridges.open(helper, route.exit, claim.slot)
            helper.bridge_rules(add=[{"address": peer.address, "slot": claim.slot}])
        # A quarantined peer's old key is already off the interface.
        helper.apply(add=[peer], remove=[claim.old_key] if claim.old_key and not claim.quarantined_at else [])
        if previous and previous.mode == "bridge" and not route.exit:
            helper.bridge_rules(remove=[peer.address])
    except Failure:
        _undo_connect(db, helper, peer, previous, claim.new_bridge)
        raise


def _connected(db, helper, ask, route, claim):
    """After a connect holds: the old exit's idle clock, usage and limits, metrics, the log and the audit.

    A tiered user's new address joins the helper's table right after its
    peer is on the interface (usage.later: the pushes of many connects go as one).
    """
    previous, peer = claim.previous, claim.peer
    if previous and previous.mode == "bridge" and previous.exit_id != route.exit_id:
        with write(db):
            store.mark_bridge_idle(db, previous.exit_id, time.time())
    if claim.old_key:
        usage.forget(db, [claim.old_key])
    if claim.limits.limited:
        usage.later(db, helper, ask.user_id)
    if claim.quarantined_at:
        metrics.SWEPT_PEERS.labels("released").inc()
    log.info("connect user=%s device=%s addr=%s key=%s mode=%s%s%s%s", ask.user_id, ask.device_id, peer.address,
             _short(ask.public_key), route.mode, " exit=%s" % route.exit_id if route.exit else "",
             " (rekeyed)" if claim.old_key else "", " (back from quarantine)" if claim.quarantined_at else "")
    audit.record("connect", peer, rekeyed=bool(claim.old_key), released_from_quarantine=bool(claim.quarantined_at))


def _undo_connect(db, helper, peer, previous, new_bridge):
    """Put the row back as it was (or drop it) and forget a bridge row made for it."""
    with undo(db):
        # The helper may have applied what it was asked before failing.
        reconcile.schedule(db)
        if previous != peer:
            store.delete(db, peer)
            if previous is not None:
                store.restore(db, previous)
        if new_bridge is not None:
            store.mark_bridge_idle(db, new_bridge, 0)
    if peer.mode == "bridge" and (previous is None or previous.mode != "bridge"):
        try:  # best effort: a rule left here is dropped by the next reconcile
            helper.bridge_rules(remove=[peer.address])
        except HELPER_ERRORS:
            pass
    log.info("connect undone for addr=%s", peer.address)


def disconnect_device(db, helper, user_id, device_id):
    """Remove the device's peer; True if there was one."""
    usage.settle(db, helper, None, [p for p in [store.by_device(db, user_id, device_id)] if p])
    with write(db):
        peer = store.by_device(db, user_id, device_id)
        if peer is None:
            return False
        store.delete(db, peer)
    _remove_or_restore(db, helper, [peer])
    _unroute(db, helper, [peer])
    log.info("disconnect user=%s device=%s addr=%s", user_id, device_id, peer.address)
    audit.record("disconnect", peer)
    return True


def forget_asked_through_own_tunnel(db, helper, user_id, device_id, source):
    """A disconnect asked from one of the device's own tunnel addresses (a full tunnel routes the node's
    address into it): once its peer is off the interface no answer could reach the device, so the row
    goes now and the peer is returned, for remove_forgotten() after the answer is out.  None (nothing
    done) for any other source: disconnect_device() then does it all before answering."""
    source = _ip(source)
    peer = store.by_device(db, user_id, device_id)
    if source is None or peer is None or source not in _tunnel_addresses(helper, peer, source.version):
        return None
    usage.settle(db, helper, None, [peer])
    with write(db):
        again = store.by_device(db, user_id, device_id)
        if again is None or again.public_key != peer.public_key:  # changed meanwhile: the ordinary path decides
            return None
        peer = again
        store.delete(db, peer)
    log.info("disconnect user=%s device=%s addr=%s, through its tunnel: its peer goes after the answer",
             user_id, device_id, peer.address)
    audit.record("disconnect", peer)
    return peer


def _tunnel_addresses(helper, peer, version):
    if version == 4:
        return {_ip(peer.address)}
    try:
        ip6 = helper.addressing().of(peer)  # IPv6 only: a disconnect that needs no helper stays so
    except HELPER_ERRORS:
        return set()
    return {_ip(ip6.split("/")[0])} if ip6 else set()


def remove_forgotten(db, helper, peer):
    """The peer of a row forget_asked_through_own_tunnel() deleted, off the interface.  No one waits
    for an error any more: if the helper cannot take it off, the next reconcile does (the database, the
    truth, no longer has it).  What it moved meanwhile is still counted (usage: its baseline keeps its
    owner), and its address leaves its user's limits."""
    usage.settle(db, helper, None, [peer])
    try:
        if not peer.quarantined_at:
            helper.apply(remove=[peer.public_key])
        usage.forget(db, [peer.public_key])
    except HELPER_ERRORS as exc:
        log.warning("could not remove the peer of addr=%s now (%s); reconcile will", peer.address, exc.message)
        with write(db):
            reconcile.schedule(db)
    _unroute(db, helper, [peer])
    if usage.plan_of(db, peer.user_id).limited:
        usage.later(db, helper, peer.user_id)


def _ip(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unroute(db, helper, peers):
    """After bridged peers are gone: drop their rules, start their bridges' idle clocks."""
    bridged = [p for p in peers if p.mode == "bridge"]
    if not bridged:
        return
    try:
        helper.bridge_rules(remove=[p.address for p in bridged])
    except HELPER_ERRORS as exc:
        # The peer is already off the interface; reconcile drops the rule.
        log.warning("could not remove bridge rules: %s", exc.message)
    with write(db):
        for exit_id in sorted({p.exit_id for p in bridged}):
            store.mark_bridge_idle(db, exit_id, time.time())


def _remove_or_restore(db, helper, peers):
    """Take the peers (their rows deleted) off the interface, then their addresses out of their users'
    limits (usage.later); if the interface change fails, the rows come back."""
    keys = [p.public_key for p in peers if not p.quarantined_at]  # the quarantined are off already
    try:
        if keys:
            helper.apply(remove=keys)
    except HELPER_ERRORS:
        with undo(db):
            reconcile.schedule(db)
            for peer in peers:
                try:
                    store.restore(db, peer)
                except sqlite3.IntegrityError:
                    log.warning("could not restore addr=%s after helper failure", peer.address)
        raise
    usage.forget(db, keys)  # their counters start from zero if they come back
    for user_id in sorted({p.user_id for p in peers}):
        if usage.plan_of(db, user_id).limited:
            usage.later(db, helper, user_id)


def add_orbnet_peer(db, helper, config, data, only_peer=False):
    """Add (or update in place) a peer provisioned by OrbNET.

    With `only_peer` (a scoped key's call) the user may hold no other peer.
    """
    addr = int(ipaddress.IPv4Address(data["assignedIP"]))
    keepalive = 0 if data["noKeepalive"] else config["KEEPALIVE"]
    if data["publicKey"] in helper.own_keys():
        raise InvalidInput.field("publicKey", OWN_KEY)
    _check_ipv6(helper, data["assignedIP"], data.get("allowedIPs6"))
    with write(db):
        limits = usage.admit(db, data["userUuid"])
        owner = store.by_key(db, data["publicKey"])
        holder = store.by_addr(db, addr)
        if only_peer and any(p.public_key != data["publicKey"] for p in store.by_user(db, data["userUuid"])):
            raise Conflict("This userUuid already holds a peer and its key may hold only one; remove it first")
        if owner and (owner.source != "orbnet" or owner.user_id != data["userUuid"] or owner.addr != addr):
            raise Conflict("This public key is already registered to another peer")
        if holder and holder != owner:
            raise Conflict("assignedIP %s is already in use" % data["assignedIP"])
        if owner:
            store.update_orbnet(db, owner.id, data["endpoint"], keepalive)
            previous = owner
        else:
            store.insert(db, {"public_key": data["publicKey"], "addr": addr, "user_id": data["userUuid"],
                              "device_id": None, "source": "orbnet", "endpoint": data["endpoint"],
                              "keepalive": keepalive})
            previous = None
        peer = store.by_key(db, data["publicKey"])
    try:
        if limits.limited:
            usage.push(db, helper, data["userUuid"])
        helper.apply(add=[peer])
    except HELPER_ERRORS:
        with undo(db):
            reconcile.schedule(db)
            if previous is None:
                store.delete(db, peer)
            else:
                store.update_orbnet(db, previous.id, previous.endpoint, previous.keepalive)
        raise
    log.info("add-peer user=%s addr=%s key=%s", data["userUuid"], peer.address, _short(peer.public_key))
    audit.record("add-peer", peer, updated=previous is not None)
    return peer


def _check_ipv6(helper, address, named):
    """The IPv6 networks an add-peer named in allowedIPs (if any) must be exactly the peer's own /128."""
    if not named:
        return
    addressing = helper.addressing()
    ip6 = addressing.ip6(address)
    if ip6 is None or named != {ipaddress.IPv6Network(ip6)}:
        raise InvalidInput.field("allowedIPs", "The only IPv6 entry allowed is the peer's own /128 (%s)."
                                 % (ip6 or "none: IPv6 is off on this server (ipv6: %s)" % addressing.mode))


def remove_user_peers(db, helper, user_id, public_key=None):
    """Remove every peer of the user (client and OrbNET), or only the one with `public_key`; return how many."""
    usage.settle(db, helper, None, [p for p in store.by_user(db, user_id) if public_key in (None, p.public_key)])
    with write(db):
        peers = [p for p in store.by_user(db, user_id) if public_key in (None, p.public_key)]
        for peer in peers:
            store.delete(db, peer)
    if peers:
        _remove_or_restore(db, helper, peers)
        _unroute(db, helper, peers)
        log.info("remove-peer user=%s removed=%d", user_id, len(peers))
        for peer in peers:
            audit.record("remove-peer", peer)
    return len(peers)
