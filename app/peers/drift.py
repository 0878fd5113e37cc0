"""The periodic reconcile at scale: find what drifted outside the write lock, repair only that under it.

reconcile.reconcile() reads every row and sends every peer to the helper
while holding the write lock; at 60,000 peers that is seconds in which no
connect or disconnect can commit (bench/profile.py, docs/benchmarks.md).
That is still what runs at start, after the helper was unreachable and for
a new interface generation, where the interface may be missing anything.
The round every RECONCILE_INTERVAL on the same interface only looks for
drift (a peer changed behind the helper's back, a change whose answer was
lost): the helper's dump and the rows are read without the lock and
compared here, a page of keys at a time (the helper keeps the dump for the
walk: wghelper/peers.py Pages); the few keys that differ are read again
under the lock, and only the ones that still differ are repaired there,
so a connect or disconnect that committed in between is never undone.
One worker does it
per interval (``meta.reconciled_at`` is taken first, as a lease), or up to
half an interval early when the sweep is due: then both run on one dump
(reconcile.Watcher.round).
"""
import dataclasses
import ipaddress
import logging
import time

from wghelper.validate import LOW_ORDER_KEYS

from . import store, usage
from .audit import SYSTEM
from .db import get_meta, set_meta, write
from ..helper import Addressing, peer_spec

log = logging.getLogger(__name__)

RESTORE_KEEPALIVE = 25  # as wghelper/peers.py: a peer the interface lost goes back to its last endpoint


def _claim(db, generation, interval, now, early=0.0):
    """Take this round (one worker per interval, or up to `early` seconds before); False when it is not due
    or not ours to do."""
    with write(db):
        if get_meta(db, "reconciled_generation") != generation:
            return False  # a new interface: the full sync's (reconcile.reconcile)
        if not interval or now - float(get_meta(db, "reconciled_at", 0)) < interval - early:
            return False
        set_meta(db, "reconciled_at", now)
        return True


def _networks(ips):
    try:
        return {str(ipaddress.ip_network(a, strict=False)) for a in ips}
    except ValueError:
        return None


def differs(have, want):
    """Whether the interface's peer `have` (a dump entry) is not the spec `want` (helper.peer_spec)."""
    if have["keepalive"] != want["keepalive"]:
        return True
    if set(have["allowed_ips"]) != set(want["allowed_ips"]) and _networks(have["allowed_ips"]) != set(
            want["allowed_ips"]):
        return True
    # The peer's roamed endpoint is kept (wghelper/peers.py _differs); a stored one must be the one used.
    return want["endpoint"] is not None and have["endpoint"] != want["endpoint"]


def plan(dump, peers, addressing):
    """(keys to put on or correct, keys to take off, {key: endpoint} that moved) from a dump and the rows."""
    have = {p["public_key"]: p for p in dump}
    wanted = {p.public_key: p for p in peers}
    fix = [key for key, peer in wanted.items()
           if key not in have or differs(have[key], peer_spec(peer, addressing))]
    stray = [key for key in have if key not in wanted]
    moved = {key: p["endpoint"] for key, p in have.items()
             if p["endpoint"] and key in wanted and wanted[key].last_endpoint != p["endpoint"]}
    return fix, stray, moved


def _live_by_key(db, keys, size=900):
    """The rows of `keys` that belong on the interface now (store.ON_INTERFACE)."""
    rows = {}
    for start in range(0, len(keys), size):
        part = keys[start:start + size]
        rows.update((p.public_key, p) for p in (store.Peer(*r) for r in db.execute(
            "SELECT %s FROM peers WHERE public_key IN (%s) AND %s"
            % (store._COLUMNS, ", ".join("?" * len(part)), store.ON_INTERFACE), part)))
    return rows


def check(db, helper, generation, interval, hello, bridges=None, audit_log=None, own=(), now=None, early=0.0):
    """One periodic round if due (or due within `early` seconds) and ours: returns the repairs made ({} when
    none), or None."""
    now = time.time() if now is None else now
    if not _claim(db, generation, interval, now, early):
        return None
    addressing = Addressing(hello)
    fix, stray, moved, have, count, after = [], [], {}, {}, 0, None
    for page, through in helper.dump_pages():
        fixing, straying, moving = plan(page, store.live_peers_between(db, after, through), addressing)
        fix += fixing
        stray += straying
        moved.update(moving)
        to_fix = set(fixing)
        have.update((p["public_key"], p) for p in page if p["public_key"] in to_fix)
        count, after = count + len(page), through
    added = removed = updated = 0
    with write(db):
        if fix or stray:
            live = _live_by_key(db, fix + stray)
            adds = []
            for key in fix:
                peer = live.get(key)
                if peer is None or (key in have and not differs(have[key], peer_spec(peer, addressing))):
                    continue  # disconnected, or repaired by its own change since the dump
                if peer.public_key in LOW_ORDER_KEYS or peer.public_key in own:
                    continue  # the full sync quarantines these (reconcile.reconcile)
                if key in have:
                    updated += 1
                else:
                    added += 1
                    if peer.last_endpoint and not peer.endpoint:
                        peer = dataclasses.replace(peer, endpoint=peer.last_endpoint,
                                                   keepalive=peer.keepalive or RESTORE_KEEPALIVE)
                adds.append(peer)
            removes = [key for key in stray if key not in live]
            removed = len(removes)
            if adds or removes:
                helper.apply(add=adds, remove=removes)
        store.set_endpoints(db, moved)
        if bridges is not None:
            bridges.sync(db, helper)
        usage.sync_limits(db, helper)
        usage.prune(db)
    repairs = {k: v for k, v in (("added", added), ("removed", removed), ("updated", updated)) if v}
    log.info("reconcile check peers=%d added=%d removed=%d updated=%d", count, added, removed, updated)
    if repairs and audit_log is not None:
        audit_log.write("reconcile", SYSTEM, None, None, peers=count, generation=generation, **repairs)
    return repairs
