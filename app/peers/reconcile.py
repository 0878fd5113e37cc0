"""Make the interface equal to the database.

Runs at start, whenever the helper reports a new interface generation (the
helper restarted or the interface was re-created), and every
RECONCILE_INTERVAL seconds (that one by app/drift.py, on the same
interface).  The rows are read under the write lock and the sync runs
without it (at 60,000 peers it takes seconds, bench/recovery.py); then,
under the lock again, what committed meanwhile is compared with what was
sent and put right (_repair), so no connect or disconnect that slipped in
between is undone by the sync.  The helper leaves alone what such a change
applied before the sync reached it (the sync's ``since``), so the peer of a
connect that lands in between is never taken off, not even until the
repair.  Several workers share the work through ``meta``: whoever takes a
generation first records it, and the others see that and skip.
"""
import dataclasses
import logging
import threading
import time

from wghelper.validate import LOW_ORDER_KEYS

from ..helper import HelperClient, HelperFailed, HelperUnavailable, own_keys
from . import drift, store, sweep, usage
from .audit import SYSTEM
from .db import DEFAULT_BUSY_TIMEOUT, connect, get_meta, set_meta, undo, write

log = logging.getLogger(__name__)

# Seconds a worker leaves a due sweep to the worker whose drift check brought it forward (Watcher.round):
# that one sweeps right after its check, seconds later even at 60,000 peers.
SWEEP_GRACE = 60.0


def reconcile(db, helper, generation=None, interval=None, bridges=None, audit_log=None, own=(),
              forget_refused=False):
    """Sync and return the helper's counts.

    With `interval`, the need is re-checked under the lock and None is
    returned when another worker has just done it.  With `bridges`
    (app/bridge/bridges.py), exit tunnels and bridged clients' rules are synced too.
    Quarantined peers (sweep.py) stay off the interface, and a peer whose
    key no peer may use (a low-order point, or one of the helper's keys
    `own`: rows from before keys were checked) is quarantined, since the
    helper refuses a sync that holds one.  For the same reason, with
    `forget_refused`, an endpoint the helper refuses (loopback, broadcast,
    ...) is forgotten: only rows from before it refused them can hold one
    (nothing stores one since), so the watcher asks for it on its first
    round, not every time (about 10 us a peer).  Where the interface saw each
    peer is kept (store.set_endpoints): a peer that the interface lost goes
    back there (wghelper/peers.py plan_sync).
    """
    with write(db):
        if interval is not None and not due(db, generation, interval):
            return None
        if generation is not None:  # taken, so the other workers do not sync it too meanwhile
            set_meta(db, "reconciled_generation", generation)
            set_meta(db, "reconciled_at", time.time())
        since = time.monotonic()  # under the lock: every change after it commits, and reaches the helper, later
        peers = store.live_peers(db)
        for bad in [p for p in peers if p.public_key in LOW_ORDER_KEYS or p.public_key in own]:
            log.warning("reconcile quarantined addr=%s: its key is a low-order point or the server's own", bad.address)
            store.set_quarantined(db, bad.id, time.time())
            peers.remove(bad)
        if forget_refused:
            peers = [_without_refused_endpoints(db, p) for p in peers]
    # The sync itself runs without the lock: at 60,000 peers it takes wireguard-go about 16 s to add
    # them all, and no connect could commit meanwhile (bench/recovery.py).  What committed during it is
    # put right below, under the lock; the helper's writer lets changes in between its slices.
    try:
        result = helper.sync(peers, since)
        with write(db):
            _repair(db, helper, peers, own)
            store.set_endpoints(db, result.pop("endpoints", None) or {})
            if bridges is not None:
                bridges.sync(db, helper)
            usage.sync_limits(db, helper)  # the helper's tiers and quotas: exactly the database's
            usage.prune(db)
            if generation is not None:
                set_meta(db, "reconciled_generation", generation)
            set_meta(db, "reconciled_at", time.time())
    except BaseException:
        with undo(db):
            schedule(db)  # every worker syncs again
        raise
    log.info("reconcile peers=%d added=%s removed=%s updated=%s kept=%s", len(peers),
             result.get("added"), result.get("removed"), result.get("updated"), result.get("kept"))
    repairs = {k: result.get(k) for k in ("added", "removed", "updated") if result.get(k)}
    if repairs and audit_log is not None:
        audit_log.write("reconcile", SYSTEM, None, None, peers=len(peers), generation=generation, **repairs)
    return result


def _shape(peer):
    """What a peer's spec on the interface is made of (helper.peer_spec)."""
    return peer.addr, peer.mode, peer.endpoint, peer.keepalive


def _repair(db, helper, sent, own):
    """Inside write(), after a sync of `sent` (the rows read before it): put on or take off the peers
    whose rows a connect, disconnect or change committed while the sync ran without the lock."""
    sent = {p.public_key: p for p in sent}
    now = {p.public_key: p for p in store.live_peers(db)
           if p.public_key not in LOW_ORDER_KEYS and p.public_key not in own}
    removes = [key for key in sent if key not in now]
    adds = [p for key, p in now.items() if key not in sent or _shape(sent[key]) != _shape(p)]
    if removes or adds:
        log.info("reconcile repaired what changed during the sync: %d on, %d off", len(adds), len(removes))
        helper.apply(add=adds, remove=removes)


def _without_refused_endpoints(db, peer):
    """`peer`, its endpoints forgotten where the helper now refuses them (a row stored before it did).

    A loopback, broadcast, multicast or unspecified endpoint is never a
    client's; one in the sync would make the helper refuse every peer.
    """
    refused = peer.endpoint is not None and store.sendable(peer.endpoint) is None
    refused_last = peer.last_endpoint is not None and store.sendable(peer.last_endpoint, last=True) is None
    if not (refused or refused_last):
        return peer
    log.warning("reconcile forgot the endpoint of addr=%s: loopback, broadcast, multicast or unspecified",
                peer.address)
    if refused:
        store.update_orbnet(db, peer.id, None, peer.keepalive)
        peer = dataclasses.replace(peer, endpoint=None)
    if refused_last:
        store.set_endpoints(db, {peer.public_key: None})
        peer = dataclasses.replace(peer, last_endpoint=None)
    return peer


def schedule(db):
    """Have the next watcher round, in whichever worker, sync in full (call inside write()).

    After a failed helper call the interface may hold a change the database
    undid (the helper ran it but its answer was lost).
    """
    set_meta(db, "reconciled_generation", "")


def due(db, generation, interval, now=None):
    """Whether a sync is needed for this generation, judged from meta."""
    now = time.time() if now is None else now
    if get_meta(db, "reconciled_generation") != generation:
        return True
    last = float(get_meta(db, "reconciled_at", 0))
    return bool(interval) and now - last >= interval


class Watcher:
    """A background loop per worker: ask the helper for its generation, sync when due."""

    def __init__(self, config, helper=None, bridges=None, audit_log=None, learner=None):
        self.config = config
        # The worker's request-path HelperClient: told each hello, so that its connects follow a helper
        # restarted in another ipv6 mode (HelperClient.learn) as this watcher's sync does.
        self.learner = learner
        self.audit_log = audit_log
        self.db_path = config["DB_PATH"]
        self.bridges = bridges
        self.helper = helper or HelperClient(config["HELPER_SOCKET"], config["HELPER_TIMEOUT"])
        self.check_interval = config["RECONCILE_CHECK_INTERVAL"]
        self.interval = config["RECONCILE_INTERVAL"]
        self._stop = threading.Event()
        self._thread = None
        self.last_error = None
        # At start and after the helper was unreachable, sync even when the
        # generation is unchanged: changes may have failed in between.
        self._eager = True

    def start(self):
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()

    def check_once(self):
        """One round: returns the sync result, or None when nothing was due."""
        hello = self.helper.hello()
        generation = hello["generation"]
        if self.learner is not None:
            self.learner.learn(hello)
        db = self._connect()
        try:
            if self._eager:
                result = reconcile(db, self.helper, generation, bridges=self.bridges, audit_log=self.audit_log,
                                   own=own_keys(hello), forget_refused=True)
            elif get_meta(db, "reconciled_generation") == generation:
                # The same interface: look for drift without holding the lock (app/drift.py); early when
                # the sweep is due, so that the two share one dump (round()).
                early = self._slack() if sweep.due(db, self.config["SWEEP_INTERVAL"], time.time()) else 0.0
                result = drift.check(db, self.helper, generation, self.interval, hello, bridges=self.bridges,
                                     audit_log=self.audit_log, own=own_keys(hello), early=early)
            elif due(db, generation, self.interval):
                result = reconcile(db, self.helper, generation, self.interval, bridges=self.bridges,
                                   audit_log=self.audit_log, own=own_keys(hello))
            else:
                result = None
            self._eager = False
            if self.bridges is not None:
                self.bridges.tick(db, self.helper)
            return result
        finally:
            db.close()

    def _connect(self):
        return connect(self.db_path, self.config.get("DB_BUSY_TIMEOUT", DEFAULT_BUSY_TIMEOUT))

    def _slack(self):
        """Seconds by which the drift check and the sweep may each run early to run in one round."""
        if not self.interval or not self.config.get("STALE_AFTER"):
            return 0.0
        return min(self.interval, self.config["SWEEP_INTERVAL"]) / 2

    def sweep_once(self, shared=False):
        """The stale-peer sweep, when it is on and this worker wins the round; `shared`: this round's
        check_once has just had the helper dump the interface (app/peers/sweep.py)."""
        if not self.config.get("STALE_AFTER"):
            return None
        db = self._connect()
        try:
            if not shared and self._drift_sweeps(db, time.time()):
                return None
            return sweep.sweep(db, self.helper, self.config, self.audit_log, early=self._slack() if shared else 0.0,
                               shared=shared)
        finally:
            db.close()

    def _drift_sweeps(self, db, now):
        """Whether another worker has just taken a drift check that brings the sweep forward: it sweeps
        right after, from the same dump (unless it has not within SWEEP_GRACE: then it failed or died)."""
        slack = self._slack()
        drift_at = float(get_meta(db, "reconciled_at", 0))
        return bool(slack) and now - drift_at < min(slack, SWEEP_GRACE) and \
            sweep.due(db, self.config["SWEEP_INTERVAL"], drift_at, slack)  # due within slack at the check

    def round(self):
        """check_once and sweep_once, with every failure logged instead of raised.

        The drift check and the sweep each read the whole interface every 300 s by default; on
        wireguard-go each dump holds every change of the interface until it is read out (1-1.5 s at
        60,000 peers: every connect meanwhile waits).  Whichever of the two falls due first brings the
        other forward by up to half an interval, so that from then on they run in the same round, the
        drift check first: the sweep's count is made from its dump (wghelper/usage.py REUSE).
        """
        try:
            dumped = self.check_once() is not None
            self.sweep_once(shared=dumped)
            self.last_error = None
        except (HelperUnavailable, HelperFailed) as exc:
            if self.last_error != exc.code:
                log.warning("reconcile waiting for helper: %s", exc.message)
            self.last_error = exc.code
            self._eager = True
        except Exception:  # the loop must outlive any one failure
            log.exception("reconcile round failed")

    def _run(self):
        while not self._stop.is_set():
            self.round()
            self._stop.wait(self.check_interval)


def init_app(app):
    if app.config["RECONCILE_CHECK_INTERVAL"] > 0:
        watcher = Watcher(app.config, bridges=app.extensions.get("orbmesh_bridges"),
                          audit_log=app.extensions.get("orbmesh_audit"), learner=app.extensions["orbmesh_helper"])
        app.extensions["orbmesh_watcher"] = watcher
        watcher.start()
