"""Peer lifecycle: the database change and the interface change, as one.

Each operation commits its row first, then asks the helper; when the
helper fails, the row change is undone, so a failed call leaves nothing
allocated.  Rows go in before the helper call (not after) so a reconcile
that runs in between never strips a peer that a client is being told about.
"""
import ipaddress
import logging
import sqlite3

from . import store
from .errors import ApiError
from .helper import HelperFailed, HelperUnavailable

log = logging.getLogger(__name__)
HELPER_ERRORS = (HelperUnavailable, HelperFailed)


def _short(key):
    return key[:8] + "..."


def connect_device(db, helper, allocator, user_id, device_id, public_key, max_devices=0):
    """Give the device a peer with `public_key`; return the Peer on the interface.

    A new device of a user who already has `max_devices` (when not 0) is
    refused; counted in the same write transaction that would allocate, so
    concurrent connects cannot pass the cap together.
    """
    with store.write(db):
        owner = store.by_key(db, public_key)
        if owner and (owner.source != "client" or (owner.user_id, owner.device_id) != (user_id, device_id)):
            raise ApiError("CONFLICT", "This public key is already registered to another peer")
        current = store.by_device(db, user_id, device_id)
        if current and current.public_key == public_key:
            peer, undo = current, None
        elif current:
            store.set_key(db, current.id, current.public_key, public_key)
            peer, undo = store.by_key(db, public_key), ("rekey", current.public_key)
        else:
            if max_devices and store.count_devices(db, user_id) >= max_devices:
                raise ApiError("DEVICE_LIMIT", "This user already has %d devices connected to this server; "
                               "disconnect one first" % max_devices)
            try:
                addr = allocator.allocate(db)
            except store.PoolExhausted:
                raise ApiError("POOL_EXHAUSTED", "No free addresses left in the pool") from None
            peer = store.insert(db, {"public_key": public_key, "addr": addr, "user_id": user_id,
                                     "device_id": device_id, "source": "client", "endpoint": None,
                                     "keepalive": 0})
            undo = ("insert", None)
    old_key = undo[1] if undo and undo[0] == "rekey" else None
    try:
        helper.apply(add=[peer.helper_spec()], remove=[old_key] if old_key else [])
    except HELPER_ERRORS:
        _undo_connect(db, peer, undo)
        raise
    log.info("connect user=%s device=%s addr=%s key=%s%s", user_id, device_id, peer.address,
             _short(public_key), " (rekeyed)" if old_key else "")
    return peer


def _undo_connect(db, peer, undo):
    if undo is None:
        return
    with store.write(db):
        if undo[0] == "insert":
            store.delete(db, peer)
        else:
            store.set_key(db, peer.id, peer.public_key, undo[1])
    log.info("connect undone for addr=%s: helper failed", peer.address)


def disconnect_device(db, helper, user_id, device_id):
    """Remove the device's peer; True if there was one."""
    with store.write(db):
        peer = store.by_device(db, user_id, device_id)
        if peer is None:
            return False
        store.delete(db, peer)
    _remove_or_restore(db, helper, [peer])
    log.info("disconnect user=%s device=%s addr=%s", user_id, device_id, peer.address)
    return True


def _remove_or_restore(db, helper, peers):
    try:
        helper.apply(remove=[p.public_key for p in peers])
    except HELPER_ERRORS:
        with store.write(db):
            for peer in peers:
                try:
                    store.restore(db, peer)
                except sqlite3.IntegrityError:
                    log.warning("could not restore addr=%s after helper failure", peer.address)
        raise


def add_orbnet_peer(db, helper, config, data):
    """Add (or update in place) a peer provisioned by OrbNET."""
    addr = int(ipaddress.IPv4Address(data["assignedIP"]))
    keepalive = 0 if data["noKeepalive"] else config["KEEPALIVE"]
    with store.write(db):
        owner = store.by_key(db, data["publicKey"])
        holder = store.by_addr(db, addr)
        if owner and (owner.source != "orbnet" or owner.user_id != data["userUuid"] or owner.addr != addr):
            raise ApiError("CONFLICT", "This public key is already registered to another peer")
        if holder and holder != owner:
            raise ApiError("CONFLICT", "assignedIP %s is already in use" % data["assignedIP"])
        if owner:
            store.update_orbnet(db, owner.id, data["endpoint"], keepalive)
            undo = owner
        else:
            store.insert(db, {"public_key": data["publicKey"], "addr": addr, "user_id": data["userUuid"],
                              "device_id": None, "source": "orbnet", "endpoint": data["endpoint"],
                              "keepalive": keepalive})
            undo = None
        peer = store.by_key(db, data["publicKey"])
    try:
        helper.apply(add=[peer.helper_spec()])
    except HELPER_ERRORS:
        with store.write(db):
            if undo is None:
                store.delete(db, peer)
            else:
                store.update_orbnet(db, undo.id, undo.endpoint, undo.keepalive)
        raise
    log.info("add-peer user=%s addr=%s key=%s", data["userUuid"], peer.address, _short(peer.public_key))
    return peer


def remove_user_peers(db, helper, user_id):
    """Remove every peer of the user (client and OrbNET); return how many."""
    with store.write(db):
        peers = store.by_user(db, user_id)
        for peer in peers:
            store.delete(db, peer)
    if peers:
        _remove_or_restore(db, helper, peers)
        log.info("remove-peer user=%s removed=%d", user_id, len(peers))
    return len(peers)
