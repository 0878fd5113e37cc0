"""Stale client peers: off the interface after STALE_AFTER idle, freed after QUARANTINE.

A client (device) peer is idle since the newest of: its latest handshake
(read from the interface: from the usage count the round starts with, or
a dump where usage is not counted; remembered in ``handshake_at`` because
an interface re-created by the helper starts every peer at "never"), its
creation or last change, and the moment the sweep first saw the current
interface generation (so a helper restart gives every peer a fresh grace
period rather than making them all look idle).

Idle for STALE_AFTER: the row is marked ``quarantined_at`` and the peer is
removed from the interface, but the address stays taken, so for QUARANTINE
seconds every log line with that address still points at one device.  The
device connecting again during quarantine gets the same row and address
back (peers.connect_device).  After QUARANTINE the row is deleted and the
address is free.  OrbNET's peers (add-peer) are never swept: only OrbNET
removes them.

The sweep runs from the reconcile watcher of every worker, but only one of
them does the work per SWEEP_INTERVAL: ``meta.swept_at`` is checked and set
in one write transaction (a lease by time).  The quarantine, the frees and
the helper call happen in one transaction under the write lock, as in
reconcile, so no connect can slip in between; if the helper fails, the
transaction is rolled back and nothing is quarantined or freed.  That is
done a SLICE of rows (by address) per transaction, with the lock let go in
between: one transaction over 60,000 rows held every connect for the walk
and a `wg set` removing thousands of peers at once (bench/profile.py).  A
helper failure ends the round there: the slices before it stay done.
"""
import logging
import time

from ..ops import metrics
from . import store, usage
from .audit import SYSTEM
from .db import get_meta, set_meta, write

log = logging.getLogger(__name__)

SLICE = 1000  # rows per write transaction


def due(db, interval, now, early=0.0):
    """Whether a round is due (or due within `early` seconds), judged from meta."""
    return now - float(get_meta(db, "swept_at", 0)) >= interval - early


def _claim(db, interval, now, early=0.0):
    """Take this round if it is due (one worker per interval); False otherwise."""
    if not due(db, interval, now, early):
        return False  # the common case, answered without the write lock
    with write(db):
        if not due(db, interval, now, early):
            return False
        set_meta(db, "swept_at", now)
        return True


def _interface_since(db, generation, now):
    """When the sweep first saw this interface generation (call inside write())."""
    if get_meta(db, "sweep_generation") != generation:
        set_meta(db, "sweep_generation", generation)
        set_meta(db, "sweep_generation_at", now)
        return now
    return float(get_meta(db, "sweep_generation_at", now))


def idle_since(peer, live_handshake, interface_since):
    return max(live_handshake or 0, peer.handshake_at or 0, peer.created_at, peer.updated_at, interface_since)


def sweep(db, helper, config, audit_log=None, now=None, early=0.0, shared=False):
    """One round if due (or due within `early` seconds): returns {"quarantined": [...], "freed": [...]} or
    None when not due.  `shared`: the helper has just dumped the interface for this worker (a drift check
    or a sync in the same watcher round), and the count the round starts with may come from that dump."""
    now = time.time() if now is None else now
    if not _claim(db, config["SWEEP_INTERVAL"], now, early):
        return None
    generation = helper.hello()["generation"]
    counted = bool(config.get("USAGE_INTERVAL"))
    handshakes, endpoints = _seen(db, helper, config, counted, audit_log, shared)
    quarantined, freed = [], []
    with write(db):
        since = _interface_since(db, generation, now)
    after = -1
    try:
        while True:
            with write(db):
                rows = store.client_peers_after(db, after, SLICE)
                if not rows:
                    break
                after = rows[-1].addr
                if counted:
                    handshakes.update(usage.handshakes_of(db, rows))
                more = _slice(db, helper, config, rows, handshakes, endpoints, since, now)
            quarantined += more[0]
            freed += more[1]
            time.sleep(0)  # a yield (gevent): connects waiting for the lock go first
    finally:
        _report(quarantined, freed, handshakes, since, now, audit_log)
    return {"quarantined": quarantined, "freed": freed}


def _seen(db, helper, config, counted, audit_log, shared=False):
    """What the interface saw: ({key: latest handshake}, {key: endpoint}).  While usage counts, one fresh
    count first: it writes both to the database (usage_devices, the rows' last endpoints), read a slice
    at a time; the dump it takes serves the usage and the status too, and only the peers that moved
    cross the socket, where the sweep's own dump sent all 60,000 (10 MB) to be read here.  Then
    ({}, {}).  `shared`: a count from the dump the helper has just made for this round (seconds old;
    the helper keeps it for ten times what it took, wghelper/usage.py) is fresh enough: a peer the
    round quarantines has had no handshake for STALE_AFTER.  Without counting: a dump, read a page at a
    time."""
    if counted:
        usage.collect(db, helper, config, force=True, fresh=not shared, audit_log=audit_log)
        return {}, {}
    handshakes, endpoints = {}, {}
    for page, _ in helper.dump_pages():
        handshakes.update((p["public_key"], p["latest_handshake"]) for p in page)
        endpoints.update((p["public_key"], p["endpoint"]) for p in page if p.get("endpoint"))
    return handshakes, endpoints


def _slice(db, helper, config, rows, handshakes, endpoints, since, now):
    """One slice of the round (call inside write()): ([quarantined], [freed])."""
    quarantined, freed = [], []
    store.set_endpoints(db, {p.public_key: endpoints[p.public_key] for p in rows if p.public_key in endpoints})
    for peer in rows:
        if peer.quarantined_at:
            if now - peer.quarantined_at >= config["QUARANTINE"]:
                store.delete(db, peer)
                freed.append(peer)
            continue
        seen = handshakes.get(peer.public_key) or 0
        if seen > (peer.handshake_at or 0):
            store.set_handshake(db, peer.id, seen)
        if now - idle_since(peer, seen, since) >= config["STALE_AFTER"]:
            store.set_quarantined(db, peer.id, now)
            quarantined.append(peer)
    # Inside the transaction: a helper failure rolls the slice's changes back.
    if quarantined:
        helper.apply(remove=[p.public_key for p in quarantined])
    unrouted = [p.address for p in freed if p.mode == "bridge"]
    if unrouted:
        # A freed address may go to a direct client next; a bridge rule
        # left for it would send that client's traffic to the exit.
        helper.bridge_rules(remove=unrouted)
    return quarantined, freed


def _report(quarantined, freed, handshakes, since, now, audit_log):
    for peer in quarantined:
        idle = round(now - idle_since(peer, handshakes.get(peer.public_key), since))
        log.info("sweep quarantined user=%s device=%s addr=%s idle=%ds", peer.user_id, peer.device_id,
                 peer.address, idle)
        if audit_log is not None:
            audit_log.write("quarantine", SYSTEM, None, peer, idle_seconds=idle)
    for peer in freed:
        log.info("sweep freed user=%s device=%s addr=%s", peer.user_id, peer.device_id, peer.address)
        if audit_log is not None:
            audit_log.write("free", SYSTEM, None, peer)
    metrics.SWEPT_PEERS.labels("quarantined").inc(len(quarantined))
    metrics.SWEPT_PEERS.labels("freed").inc(len(freed))
