"""Usage, speed tiers and data quotas per user: counted and decided here, enforced by the helper.

Usage.  The interface counts bytes per peer, and its counters start from
zero whenever a peer leaves it and comes back or the link is made again.
So the app keeps, per peer key, the counters it counted last (usage_seen,
with the link's epoch: boot and ifindex) and adds what they grew to the
device's usage (usage_devices), in one write transaction with the new
baseline; a counter that went down, a new epoch or a key not seen before
count from zero.  The helper answers only the peers that moved since the
sample the app counted last (meta ``usage_sample``), and a sample no newer
than that one is dropped, so whichever worker counts, no delta is counted
twice.  Before the app itself takes a peer off the interface (disconnect,
remove-peer, a new key) it counts a fresh sample if the peer moved bytes
lately (settle): a disconnect in the middle of a download loses nothing.
Up is what the node received from the device (the peer's rx), down what it
sent.  Tunnel sessions' bytes are the same bytes (they reach WireGuard on
loopback): they are counted once, here, and only name the transport.

Collection runs in the reconcile watcher of every worker, once per
USAGE_INTERVAL across them (a time lease in ``meta``, as the sweep's), and
less often when a sample costs more (a dump of 10,000 peers): at most
COST_SHARE of one core.  On wireguard-go a dump also holds every change of
the interface until it is read out (0.7-1 s at 60,000 peers under load),
so every connect that arrives meanwhile waits for it: counts whose dump
blocks longer than STALL_FREE are spaced so that they hold the interface
at most STALL_SHARE of the time, also while a user nears the quota (the
quota object in the helper's table stops the user at the quota between
counts).  The kernel's dump takes its lock a message at a time.

Limits.  A user's speed tier and quota are OrbNET's (POST /wireguard/limits:
``rate_from``/``quota_from`` 'api') or, until OrbNET sets them, the device
token's claims ('token'); the API's values win, a null from the API too.
The helper holds them in its nftables table (wghelper/limits.py) for every
address the user holds now: a connect's new address joins it right after
its peer is on the interface, a disconnect takes it out after (later(): the
changes of a moment go in one call; a limits call of OrbNET's is pushed at
once).

Quota.  When a user's usage in the period reaches the quota, every peer of
the user leaves the interface and the rows stay (``cut_at``; reconcile
keeps them off: store.ON_INTERFACE), connect and the tunnels answer 403
QUOTA_EXCEEDED, and the audit log gets one ``quota`` line.  Between two
counts the helper's quota object stops the user's packets at the quota
(the backstop), aimed at each count once half the quota is used (aim()).
A new period (resetUsage) or a quota above the usage puts the peers back
at once, each towards its last endpoint with a keepalive, so WireGuard
handshakes again without waiting for the client.
"""
import base64
import binascii
import dataclasses
import json
import logging
import threading
import time

from flask import current_app, g

from wghelper.validate import IDENTIFIER_RE

from ..failures import InvalidInput, QuotaExceeded
from ..helper import HelperClient, HelperFailed, HelperUnavailable
from ..ops import metrics
from . import audit, reconcile, store
from .audit import SYSTEM
from .db import DEFAULT_BUSY_TIMEOUT, connect, get_meta, set_meta, undo, write

log = logging.getLogger(__name__)
HELPER_ERRORS = (HelperUnavailable, HelperFailed)

COST_SHARE = 0.01          # the collector's part of one core, by the wall time of a count (its CPU ran 1.35x that)
NEAR_SHARE = 0.25          # ... and while a user nears the quota
STALL_SHARE = 0.0025       # of the time, at most, that counts' dumps hold the interface's changes
STALL_FREE = 0.05          # seconds: a dump that holds them no longer than a `wg set` takes is not spaced
MIN_GAP = 0.05             # seconds: the shortest time between two counts
FRESH_BELOW = 1.0          # a count due sooner than this asks the helper for a new dump (its own are reused 1 s)
ACTIVE_BYTES = 16384       # a peer that moved this much in a sample moved lately (settle counts afresh)
SETTLE_WINDOW = 10.0       # seconds
RESTORE_KEEPALIVE = 25     # a released peer goes back to its last endpoint with this (wghelper/peers.py)
AIM_FROM = (1, 2)          # a user's quota object follows each count once this share of the quota is used
PAGE = 1000
_USER = IDENTIFIER_RE


# --- the plan: tier and quota in effect -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    user_id: str
    rate_mbps: int | None
    rate_from: str | None
    quota_bytes: int | None
    quota_from: str | None
    period: int
    period_start: float | None
    cut_at: float | None

    @property
    def limited(self):
        return self.rate_mbps is not None or self.quota_bytes is not None


_PLAN = "user_id, rate_mbps, rate_from, quota_bytes, quota_from, period, period_start, cut_at"


def plan_of(db, user_id):
    row = db.execute("SELECT %s FROM usage_users WHERE user_id = ?" % _PLAN, (user_id,)).fetchone()
    return Plan(*row) if row else Plan(user_id, None, None, None, None, 0, None, None)


def _ensure(db, user_id, now=None):
    db.execute("INSERT INTO usage_users (user_id, period_start) VALUES (?, ?) ON CONFLICT (user_id) DO NOTHING",
               (user_id, time.time() if now is None else now))


def total_of(db, user_id):
    return db.execute("SELECT coalesce(sum(bytes_up + bytes_down), 0) FROM usage_devices WHERE user_id = ?",
                      (user_id,)).fetchone()[0]


def token_plan(claims):
    """The plan claims of a device token, checked like the API's fields; 400 naming the claim."""
    plan = {}
    for claim, low, high in (("rate_mbps", 1, 100_000), ("quota_bytes", 0, 10 ** 15)):
        if claim not in claims:
            continue
        value = claims[claim]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high):
            raise InvalidInput("The device token's plan is invalid", {"fields": {
                "token." + claim: ["Must be null or an integer from %d to %d." % (low, high)]}})
        plan[claim] = value
    return plan


def over_quota(plan, total):
    return plan.quota_bytes is not None and total >= plan.quota_bytes


def quota_exceeded(plan, total):
    return QuotaExceeded("This user's data quota on this server is used up",
                         {"usageBytes": total, "quotaBytes": plan.quota_bytes})


def admit(db, user_id, claims=None):
    """Inside a connect's write transaction: take the token's plan where the API set none, and refuse a
    user at the quota.  Returns the Plan in effect."""
    claims = token_plan(claims or {})
    plan = plan_of(db, user_id)
    if plan.period_start is None:
        _ensure(db, user_id)
    if not claims and not plan.limited and plan.cut_at is None:
        return plan  # the common connect: one read, nothing written
    if "rate_mbps" in claims:
        db.execute("UPDATE usage_users SET rate_mbps = ?, rate_from = 'token' WHERE user_id = ? "
                   "AND coalesce(rate_from, '') != 'api'", (claims["rate_mbps"], user_id))
    if "quota_bytes" in claims:
        db.execute("UPDATE usage_users SET quota_bytes = ?, quota_from = 'token' WHERE user_id = ? "
                   "AND coalesce(quota_from, '') != 'api'", (claims["quota_bytes"], user_id))
    plan, total = plan_of(db, user_id), total_of(db, user_id)
    if plan.cut_at is not None or over_quota(plan, total):
        raise quota_exceeded(plan, total)
    if plan.limited:
        set_meta(db, "limits_used", 1)
    return plan


# --- pushing limits to the helper ------------------------------------------------------------------

def _entry(db, helper, plan, peers=None):
    """The helper's `limits` entry for a user: plan and every address the user holds on the interface."""
    peers = [p for p in store.by_user(db, plan.user_id) if p.quarantined_at is None] if peers is None else peers
    addressing = helper.addressing()
    addresses = []
    for peer in peers if plan.cut_at is None and plan.limited else ():
        addresses.append(peer.address)
        ip6 = addressing.of(peer)
        if ip6:
            addresses.append(ip6.split("/")[0])
    entry = {"user": plan.user_id, "addresses": addresses}
    if plan.rate_mbps is not None:
        entry["rate_mbps"] = plan.rate_mbps
    if plan.quota_bytes is not None:
        entry.update(quota=plan.quota_bytes, used=total_of(db, plan.user_id), period=plan.period)
    return entry


def entry(db, helper, user_id):
    """The helper's `limits` entry for the user as the database has it now."""
    return _entry(db, helper, plan_of(db, user_id))


def push(db, helper, user_id):
    """Send the user's limits and addresses to the helper (a user without limits leaves its table)."""
    return helper.limits([entry(db, helper, user_id)])


def push_quietly(db, helper, user_id):
    """push() after a peer left; a failure leaves a stale entry that the next reconcile replaces."""
    try:
        push(db, helper, user_id)
    except HELPER_ERRORS as exc:
        pushed_late(db, user_id, exc)


def pushed_late(db, user_id, exc):
    """A limits update after peers came or left failed: the next reconcile puts the helper's table right."""
    log.warning("limits of user=%s not updated: %s", user_id, exc.message)
    with write(db):
        reconcile.schedule(db)


def later(db, helper, user_id):
    """The user's addresses changed (a connect, a disconnect): its limits follow, with those of the other
    users whose addresses changed meanwhile, in one helper call (Pusher).  Without the watcher (tests),
    at once."""
    pusher = current_app.extensions.get("orbmesh_limits_pusher")
    if pusher is None:
        push_quietly(db, helper, user_id)
    else:
        pusher.want(user_id)


class Pusher:
    """Each worker's queue of users whose addresses changed; one greenlet sends their limits together.

    A tiered connect or disconnect costs the helper an nft run (a fork): under a burst of connects the
    runs, not the connects, were the limit (bench/usage.py).  So the connect answers once its peer is on
    the interface, and its address joins the table a moment later (LINGER, or as long as the previous
    call takes), merged with every other change of that moment into one call.  A failure schedules a
    reconcile, which writes every limit again.
    """

    LINGER = 0.02

    def __init__(self, config, helper=None):
        self.config = config
        self.helper = helper or HelperClient(config["HELPER_SOCKET"], config["HELPER_TIMEOUT"])
        self._wanted = set()
        self._wake = threading.Event()
        self._thread = None
        self._db = None

    def want(self, user_id):
        self._wanted.add(user_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="limits-pusher", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self):
        self._db = connect(self.config["DB_PATH"], self.config.get("DB_BUSY_TIMEOUT", DEFAULT_BUSY_TIMEOUT))
        while True:
            self._wake.wait()
            time.sleep(self.LINGER)  # let the changes of this moment gather
            self._wake.clear()
            users, self._wanted = sorted(self._wanted), set()
            try:
                self.helper.limits([entry(self._db, self.helper, u) for u in users])
            except HELPER_ERRORS as exc:
                pushed_late(self._db, ",".join(users), exc)
            except Exception:  # the loop must outlive any one failure (a locked database, say)
                log.exception("limits push failed")
                try:
                    with write(self._db):
                        reconcile.schedule(self._db)
                except Exception:
                    log.exception("could not schedule a reconcile")


def sync_limits(db, helper):
    """Inside reconcile: the helper's table holds exactly the limits of the users on the interface (no
    call on a node that never had a limit)."""
    if not get_meta(db, "limits_used"):
        return None
    plans = [Plan(*row) for row in db.execute(
        "SELECT %s FROM usage_users WHERE cut_at IS NULL AND (rate_mbps IS NOT NULL OR quota_bytes IS NOT NULL)"
        % _PLAN)]
    live = {}
    for peer in store.live_peers(db):
        live.setdefault(peer.user_id, []).append(peer)
    entries = [e for e in (_entry(db, helper, p, live.get(p.user_id, [])) for p in plans) if e["addresses"]]
    return helper.limits(entries, replace=True)


# --- counting ------------------------------------------------------------------------------------

def _since(db):
    raw = get_meta(db, "usage_sample")
    return json.loads(raw) if raw else None


def _stall_gap(db):
    """Seconds between two counts for their dumps to hold the interface at most STALL_SHARE of the time."""
    stall = float(get_meta(db, "usage_stall", 0))
    return stall / STALL_SHARE if stall > STALL_FREE else 0.0


def _spacing(db):
    return max(float(get_meta(db, "usage_cost", 0)) / COST_SHARE, _stall_gap(db))


def interval(db, config):
    """Seconds between two counts: USAGE_INTERVAL, or more when a count costs more than COST_SHARE of a core
    or holds the interface more than STALL_SHARE of the time."""
    return max(config["USAGE_INTERVAL"], _spacing(db))


def _claim(db, config, now):
    """Take the count that is due (meta usage_next_at), once across the workers; the lease lasts an
    interval, in case this worker dies before it sets the next."""
    if now < float(get_meta(db, "usage_next_at", 0)):
        return False
    with write(db):
        if now < float(get_meta(db, "usage_next_at", 0)):
            return False
        set_meta(db, "usage_next_at", now + interval(db, config))
        return True


def collect(db, helper, config, force=False, fresh=False, audit_log=None):
    """Count one sample (when due, or `force`); cut the users it takes to their quota, and set when the
    next count is due.  Returns the users whose usage moved, or None when nothing was counted."""
    now = time.time()
    if not force and not _claim(db, config, now):
        return None
    sample = helper.usage(since=_since(db), fresh=fresh or bool(get_meta(db, "usage_fresh")))
    with write(db):
        started = time.perf_counter()  # the cost is the helper's dump and our counting, not the lock's wait
        last = _since(db)
        if last and last["boot"] == sample["boot"] and sample["taken_at"] <= last["taken_at"]:
            return None  # this sample or a newer one is counted already
        moved = _count(db, sample, config, now)
        elapsed = sample["taken_at"] - last["taken_at"] if last and last["boot"] == sample["boot"] else 0
        set_meta(db, "usage_sample", json.dumps({"boot": sample["boot"], "taken_at": sample["taken_at"]}))
        set_meta(db, "usage_cost", round(sample.get("dump_seconds", 0) + time.perf_counter() - started, 4))
        set_meta(db, "usage_stall", sample.get("dump_seconds", 0) if sample.get("dump_blocks") else 0)
        gap = _next_gap(db, config, moved["users"], elapsed)
        set_meta(db, "usage_next_at", now + gap)
        set_meta(db, "usage_fresh", "1" if gap < FRESH_BELOW else "")
    for (transport, direction), size in moved["bytes"].items():
        metrics.USAGE_BYTES.labels(transport, direction).inc(size)
    log.debug("usage counted %d peers (%d moved), next count in %.3f s", len(sample["peers"]), len(moved["users"]),
              gap)
    enforce(db, helper, set(moved["users"]) | set(sample.get("over_quota", ())), audit_log,
            kernel=set(sample.get("over_quota", ())))
    aim(db, helper, moved["users"])
    return set(moved["users"])


def aim(db, helper, user_ids):
    """After a count: the quota objects of the users who moved bytes and used half their quota or more
    are aimed at the new usage (wghelper/limits.py aim()).  The object counts IP packets, the usage
    WireGuard's, and it holds 25/26 of what was left when it was last aimed: aimed at the usage of
    this count, it cuts at most 1.7% of the half left early, 0.85% of the quota, where it could cut
    1.7% of the quota early before.  Best effort: an object not aimed again still stops the user."""
    entries = []
    for user_id in sorted(user_ids):
        plan = plan_of(db, user_id)
        if plan.quota_bytes is not None and plan.cut_at is None and \
                total_of(db, user_id) * AIM_FROM[1] >= plan.quota_bytes * AIM_FROM[0]:
            entries.append(_entry(db, helper, plan))
    entries = [e for e in entries if e["addresses"]]
    if entries:
        try:
            helper.limits(entries)
        except HELPER_ERRORS as exc:
            log.warning("quota objects of %d users not aimed at their usage: %s", len(entries), exc.message)


def _next_gap(db, config, moved, elapsed):
    """Seconds to the next count: the interval, or, while a user with a quota moves towards it, half the
    time the user would take to reach it at this pace (the counters are read often enough to cut near
    the quota; the helper's quota object stops what runs past it in between).  Never more often than
    NEAR_SHARE of a core and STALL_SHARE of the interface's time allow."""
    gap = interval(db, config)
    floor = max(MIN_GAP, float(get_meta(db, "usage_cost", 0)) / NEAR_SHARE, _stall_gap(db))
    for user_id, size in moved.items():
        plan = plan_of(db, user_id)
        if elapsed > 0 and size > 0 and plan.quota_bytes is not None and plan.cut_at is None:
            left = plan.quota_bytes - total_of(db, user_id)
            if left > 0:
                gap = min(gap, max(floor, left / (size / elapsed) / 2))
    return gap


def _loopback(config):
    hosts = {"127.0.0.1", "::1", config["TUNNEL_TARGET_HOST"]}
    return lambda host: host in hosts or host.startswith("127.")


def _count(db, sample, config, now):
    """Add what each peer of `sample` moved since its baseline to its device (inside write())."""
    epoch = "%s:%s" % (sample["boot"], sample["epoch"])
    keys = [p[0] for p in sample["peers"]]
    seen = {r[0]: r for r in _chunked(db, "SELECT public_key, epoch, rx, tx, user_id, source, device, active_at "
                                           "FROM usage_seen WHERE public_key IN (%s)", keys)}
    owners = {r[0]: r[1:] for r in _chunked(db, "SELECT public_key, user_id, source, coalesce(device_id, public_key) "
                                                "FROM peers WHERE public_key IN (%s)", [k for k in keys if k not in seen])}
    on_loopback = _loopback(config)
    counted, devices, endpoints = [], [], {}
    for key, rx, tx, handshake, endpoint in sample["peers"]:
        row = seen.get(key)
        if row is None and key not in owners:
            continue  # not ours (reconcile takes it off), or its row went before it was ever counted
        owner = row[4:7] if row else owners[key]
        fresh = row is None or row[1] != epoch or rx < row[2] or tx < row[3]
        up, down = (rx, tx) if fresh else (rx - row[2], tx - row[3])
        if not up and not down and not endpoint and not handshake and (row is None or not fresh):
            continue  # nothing moved and nothing to remember (no baseline is a baseline of zero)
        active = now if up + down >= ACTIVE_BYTES else (row[7] if row else None)
        counted.append((key, epoch, rx, tx, *owner, active))
        host = endpoint.rsplit(":", 1)[0].strip("[]") if endpoint else None
        devices.append((*owner, up, down, handshake or None, None if host is None else on_loopback(host)))
        if endpoint:
            endpoints[key] = endpoint
    # A peer on loopback is a tunnel session: its transport is the one the device opened last.
    tunnels = {r[:3]: r[3] for r in _chunked(db, "SELECT user_id, source, device, tunnel FROM usage_devices "
                                                 "WHERE tunnel IS NOT NULL AND user_id IN (%s)",
                                             sorted({d[0] for d in devices if d[6]}))}
    moved = {"bytes": {}, "users": {}}
    rows = []
    for user_id, source, device, up, down, handshake, tunnel in devices:
        transport = None if tunnel is None else (tunnels.get((user_id, source, device), "ws") if tunnel else "udp")
        rows.append((user_id, source, device, up, down, handshake, transport))
        if up or down:
            moved["users"][user_id] = moved["users"].get(user_id, 0) + up + down
            for direction, size in (("up", up), ("down", down)):
                if size:
                    k = (transport or "udp", direction)
                    moved["bytes"][k] = moved["bytes"].get(k, 0) + size
    db.executemany("INSERT INTO usage_seen (public_key, epoch, rx, tx, user_id, source, device, active_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (public_key) DO UPDATE SET epoch = excluded.epoch, "
                   "rx = excluded.rx, tx = excluded.tx, active_at = excluded.active_at", counted)
    db.executemany("INSERT INTO usage_users (user_id, period_start) VALUES (?, ?) ON CONFLICT (user_id) DO NOTHING",
                   [(user_id, now) for user_id in {r[0] for r in rows}])
    db.executemany(
        "INSERT INTO usage_devices (user_id, source, device, bytes_up, bytes_down, handshake_at, transport) "
        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (user_id, source, device) DO UPDATE SET "
        "bytes_up = bytes_up + ?4, bytes_down = bytes_down + ?5, handshake_at = CASE WHEN ?6 IS NULL THEN "
        "handshake_at ELSE max(coalesce(handshake_at, 0), ?6) END, transport = coalesce(?7, transport)", rows)
    store.set_endpoints(db, endpoints)
    return moved


def _chunked(db, query, keys, size=900):
    for start in range(0, len(keys), size):
        part = keys[start:start + size]
        yield from db.execute(query % ", ".join("?" * len(part)), part)


def handshakes_of(db, peers):
    """{public key: the latest handshake counted for its device} of client `peers` that ever had one."""
    devices = {(p.user_id, p.source, p.device_id or p.public_key): p.public_key for p in peers}
    found = {}
    for user_id, source, device, at in _chunked(db, "SELECT user_id, source, device, handshake_at FROM usage_devices "
                                                    "WHERE handshake_at IS NOT NULL AND user_id IN (%s)",
                                                sorted({p.user_id for p in peers})):
        key = devices.get((user_id, source, device))
        if key is not None:
            found[key] = at
    return found


def note_tunnel(db, user_id, device_id, transport):
    """A device opened a tunnel session (ws or http): its bytes on loopback are that transport's."""
    with write(db):
        _ensure(db, user_id)
        db.execute("INSERT INTO usage_devices (user_id, source, device, tunnel) VALUES (?, 'client', ?, ?) "
                   "ON CONFLICT (user_id, source, device) DO UPDATE SET tunnel = excluded.tunnel, "
                   "transport = CASE WHEN transport IN ('ws', 'http') THEN excluded.tunnel ELSE transport END",
                   (user_id, device_id, transport))


def settle(db, helper, config, peers, audit_log=None):  # config None: the app's
    """Before the app takes `peers` off the interface: count a fresh sample if one of them moved bytes
    lately, so what it moved since the last count is not lost.  Best effort."""
    keys = [p.public_key for p in peers if p.quarantined_at is None]
    # Moved within the last few counts (each at most SETTLE_WINDOW apart, or what the cost stretches them to).
    recent = time.time() - 3 * max(SETTLE_WINDOW, _spacing(db))
    if not keys or not any(r[0] and r[0] >= recent for r in _chunked(
            db, "SELECT active_at FROM usage_seen WHERE public_key IN (%s)", keys)):
        return
    config = current_app.config if config is None else config
    try:
        collect(db, helper, config, force=True, fresh=True, audit_log=audit_log)
    except HELPER_ERRORS as exc:
        log.warning("usage not counted before removing %d peers: %s", len(keys), exc.message)


def prune(db):
    """Inside reconcile, right after the interface was made equal to the database: baselines of keys that
    have no row are of peers that are gone."""
    db.execute("DELETE FROM usage_seen WHERE public_key NOT IN (SELECT public_key FROM peers)")


def forget(db, keys):
    """The peers left the interface: their next counters start from zero.  Most peers that leave never
    moved a byte and have no baseline: then nothing is written (no write lock taken)."""
    if keys and any(True for _ in _chunked(db, "SELECT 1 FROM usage_seen WHERE public_key IN (%s)", list(keys))):
        with write(db):
            db.executemany("DELETE FROM usage_seen WHERE public_key = ?", [(k,) for k in keys])


# --- enforcing the quota ----------------------------------------------------------------------------

def enforce(db, helper, user_ids, audit_log=None, kernel=()):
    """Cut every user of `user_ids` whose usage reached the quota, or whose quota object the helper's
    table used up (`kernel`); a failure is counted and retried at the next count."""
    for user_id in sorted(user_ids):
        plan, total = plan_of(db, user_id), total_of(db, user_id)
        if plan.cut_at is None and (over_quota(plan, total) or (user_id in kernel and plan.quota_bytes is not None)):
            try:
                cut(db, helper, user_id, audit_log, user_id in kernel)
            except HELPER_ERRORS as exc:
                metrics.QUOTA_FAILURES.inc()
                log.error("quota: could not cut user=%s: %s", user_id, exc.message)


def cut(db, helper, user_id, audit_log=None, kernel=False):
    """Every peer of the user off the interface, rows kept; in one transaction with the helper's change.
    `kernel`: the helper's quota object is used up (the usage may be a little short of the quota)."""
    with write(db):
        plan, total = plan_of(db, user_id), total_of(db, user_id)
        if plan.cut_at is not None or plan.quota_bytes is None or not (kernel or over_quota(plan, total)):
            return False
        peers = [p for p in store.by_user(db, user_id) if p.quarantined_at is None]
        db.execute("UPDATE usage_users SET cut_at = ? WHERE user_id = ?", (time.time(), user_id))
        if peers:
            helper.apply(remove=[p.public_key for p in peers])  # a failure rolls the cut back
    forget(db, [p.public_key for p in peers])
    push_quietly(db, helper, user_id)  # the user's addresses and quota object leave the table
    metrics.QUOTA_CUTS.inc()
    log.info("quota: user=%s cut at %d of %d bytes, %d peers off the interface", user_id, total, plan.quota_bytes,
             len(peers))
    if audit_log is not None:
        audit_log.write("quota", SYSTEM, None, None, user=user_id, usage_bytes=total, quota_bytes=plan.quota_bytes,
                        peers=len(peers))
    return True


def _restored(peer):
    """A released peer as the helper gets it: towards its last endpoint, with a keepalive that makes
    WireGuard handshake at once (the next reconcile sets the peer's own again)."""
    if peer.source == "client" and peer.last_endpoint and not peer.endpoint:
        return dataclasses.replace(peer, endpoint=peer.last_endpoint, keepalive=RESTORE_KEEPALIVE)
    return peer


# --- the API: limits and usage -----------------------------------------------------------------------

def set_limits(db, helper, config, data):
    """POST /wireguard/limits: the user's tier and quota (a null clears), and a new period on resetUsage.
    A user under the quota again is back at once; one at or over it is cut at once.  A helper failure
    undoes the change."""
    user_id = data["userUuid"]
    if data["resetUsage"]:
        settle(db, helper, config, [p for p in store.by_user(db, user_id) if p.quarantined_at is None])
    with write(db):
        _ensure(db, user_id)
        set_meta(db, "limits_used", 1)
        before = plan_of(db, user_id)
        saved = db.execute("SELECT user_id, source, device, bytes_up, bytes_down FROM usage_devices WHERE user_id = ?",
                           (user_id,)).fetchall() if data["resetUsage"] else []
        if "rateMbps" in data:
            db.execute("UPDATE usage_users SET rate_mbps = ?, rate_from = 'api' WHERE user_id = ?",
                       (data["rateMbps"], user_id))
        if "quotaBytes" in data:
            db.execute("UPDATE usage_users SET quota_bytes = ?, quota_from = 'api' WHERE user_id = ?",
                       (data["quotaBytes"], user_id))
        if data["resetUsage"]:
            db.execute("UPDATE usage_users SET period = period + 1, period_start = ? WHERE user_id = ?",
                       (time.time(), user_id))
            db.execute("UPDATE usage_devices SET bytes_up = 0, bytes_down = 0 WHERE user_id = ?", (user_id,))
        after, total = plan_of(db, user_id), total_of(db, user_id)
        release = before.cut_at is not None and not over_quota(after, total)
        if release:
            db.execute("UPDATE usage_users SET cut_at = NULL WHERE user_id = ?", (user_id,))
    try:
        if before.cut_at is None or release:
            push(db, helper, user_id)
        if release:
            peers = [_restored(p) for p in store.by_user(db, user_id) if p.quarantined_at is None]
            if peers:
                helper.apply(add=peers)
    except HELPER_ERRORS:
        with undo(db):
            reconcile.schedule(db)
            db.execute("UPDATE usage_users SET rate_mbps = ?, rate_from = ?, quota_bytes = ?, quota_from = ?, "
                       "period = ?, period_start = ?, cut_at = ? WHERE user_id = ?",
                       (before.rate_mbps, before.rate_from, before.quota_bytes, before.quota_from, before.period,
                        before.period_start, before.cut_at, user_id))
            db.executemany("UPDATE usage_devices SET bytes_up = ?4, bytes_down = ?5 WHERE user_id = ?1 AND "
                           "source = ?2 AND device = ?3", saved)
        raise
    audit.record("limits", None, user=user_id, rate_mbps=after.rate_mbps, quota_bytes=after.quota_bytes,
                 reset_usage=data["resetUsage"], released=release)
    log.info("limits user=%s rate=%s quota=%s reset=%s%s", user_id, after.rate_mbps, after.quota_bytes,
             data["resetUsage"], " (back from the quota)" if release else "")
    if after.cut_at is None and not release and over_quota(after, total):
        try:
            cut(db, helper, user_id, current_app.extensions.get("orbmesh_audit"))
        except HELPER_ERRORS as exc:
            metrics.QUOTA_FAILURES.inc()
            log.error("quota: could not cut user=%s: %s", user_id, exc.message)
    return user_usage(db, user_id)


def _iso(when):
    return None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _users_usage(db, user_ids):
    """{user: usage dict} for `user_ids` (unknown users: usage zero)."""
    plans = {r[0]: Plan(*r) for r in _chunked(db, "SELECT %s FROM usage_users WHERE user_id IN (%%s)" % _PLAN,
                                              user_ids)}
    devices, peers = {}, {}
    for row in _chunked(db, "SELECT user_id, source, device, bytes_up, bytes_down, handshake_at, transport "
                            "FROM usage_devices WHERE user_id IN (%s) ORDER BY user_id, source, device", user_ids):
        devices.setdefault(row[0], {})[(row[1], row[2])] = row
    for row in _chunked(db, "SELECT user_id, source, coalesce(device_id, public_key), public_key, quarantined_at "
                            "FROM peers WHERE user_id IN (%s)", user_ids):
        peers.setdefault(row[0], {})[(row[1], row[2])] = row
    found = {}
    for user_id in user_ids:
        plan = plans.get(user_id) or Plan(user_id, None, None, None, None, 0, None, None)
        mine, live = devices.get(user_id, {}), peers.get(user_id, {})
        listed = []
        for ident in sorted(set(mine) | set(live)):
            d, p = mine.get(ident), live.get(ident)
            up, down = (d[3], d[4]) if d else (0, 0)
            state = "disconnected" if p is None else ("quota" if plan.cut_at else (
                "quarantined" if p[4] else "active"))
            listed.append({"deviceId": ident[1] if ident[0] == "client" else None, "source": ident[0],
                           "publicKey": p[3] if p else (ident[1] if ident[0] == "orbnet" else None),
                           "bytesUp": up, "bytesDown": down, "bytes": up + down,
                           "lastHandshake": _iso(d[5]) if d else None, "transport": d[6] if d else None,
                           "connected": p is not None, "state": state})
        up, down = sum(x["bytesUp"] for x in listed), sum(x["bytesDown"] for x in listed)
        found[user_id] = {"userUuid": user_id, "period": plan.period, "periodStart": _iso(plan.period_start),
                          "rateMbps": plan.rate_mbps, "quotaBytes": plan.quota_bytes,
                          "limitsFrom": {"rateMbps": plan.rate_from, "quotaBytes": plan.quota_from},
                          "state": "quota_exceeded" if plan.cut_at else "active",
                          "total": {"bytesUp": up, "bytesDown": down, "bytes": up + down}, "devices": listed}
    return found


def user_usage(db, user_id):
    return _users_usage(db, [user_id])[user_id]


def encode_cursor(user_id):
    return base64.urlsafe_b64encode(user_id.encode()).decode().rstrip("=")


def decode_cursor(cursor):
    """The user a cursor points after; ValueError when it is not one of ours."""
    try:
        user_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor") from None
    if not _USER.match(user_id) or encode_cursor(user_id) != cursor:
        raise ValueError("not a cursor")
    return user_id


def page(db, cursor=None, limit=PAGE):
    """(users' usage in user order after `cursor`, the next cursor or None)."""
    after = decode_cursor(cursor) if cursor else ""
    ids = [r[0] for r in db.execute(
        "SELECT user_id FROM usage_users WHERE user_id > ?1 UNION SELECT user_id FROM usage_devices WHERE user_id > ?1 "
        "UNION SELECT user_id FROM peers WHERE user_id > ?1 ORDER BY 1 LIMIT ?2", (after, limit + 1))]
    more = len(ids) > limit
    ids = ids[:limit]
    found = _users_usage(db, ids)
    return [found[u] for u in ids], encode_cursor(ids[-1]) if more else None


# --- the tunnels' check, cached per worker -------------------------------------------------------------

class CutUsers:
    """Users the quota cut, {user: (usage, quota)}, read at most every TTL seconds per worker: the HTTP
    tunnel asks on every request."""

    TTL = 1.0

    def __init__(self):
        self._at = 0.0
        self._users = {}
        self._lock = threading.Lock()

    def get(self, db):
        if time.monotonic() - self._at >= self.TTL:
            with self._lock:
                if time.monotonic() - self._at >= self.TTL:
                    self._users = {r[0]: (r[1], r[2]) for r in db.execute(
                        "SELECT u.user_id, (SELECT coalesce(sum(bytes_up + bytes_down), 0) FROM usage_devices d "
                        "WHERE d.user_id = u.user_id), u.quota_bytes FROM usage_users u WHERE u.cut_at IS NOT NULL")}
                    self._at = time.monotonic()
        return self._users


def refuse_cut(db, user_id):
    """403 QUOTA_EXCEEDED for a user the quota cut (the tunnel endpoints)."""
    hit = current_app.extensions["orbmesh_cut_users"].get(db).get(user_id)
    if hit is not None:
        raise QuotaExceeded("This user's data quota on this server is used up",
                            {"usageBytes": hit[0], "quotaBytes": hit[1]})


def device_plan():
    """The plan claims of the request's device token (auth.authenticate_device)."""
    return g.get("device_plan") or {}


class Collector:
    """Each worker's counting loop: count when a count is due (usage_next_at, shared by the workers),
    then sleep until the next one is, looking again at least every second."""

    def __init__(self, config, helper=None, audit_log=None):
        self.config, self.audit_log = config, audit_log
        self.helper = helper or HelperClient(config["HELPER_SOCKET"], config["HELPER_TIMEOUT"])
        self.poll = min(config["USAGE_INTERVAL"], 1.0)
        self._stop = threading.Event()
        self._thread = None
        self.last_error = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="usage", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()

    def round(self, db):
        """One look: count if due; the seconds to wait before the next look."""
        try:
            collect(db, self.helper, self.config, audit_log=self.audit_log)
            self.last_error = None
            return min(max(float(get_meta(db, "usage_next_at", 0)) - time.time(), 0.01), self.poll)
        except HELPER_ERRORS as exc:
            if self.last_error != exc.code:
                log.warning("usage waiting for helper: %s", exc.message)
            self.last_error = exc.code
        except Exception:  # the loop must outlive any one failure (a locked database, say)
            log.exception("usage round failed")
        return self.poll

    def _run(self):
        db = connect(self.config["DB_PATH"], self.config.get("DB_BUSY_TIMEOUT", DEFAULT_BUSY_TIMEOUT))
        try:
            while not self._stop.is_set():
                self._stop.wait(self.round(db))
        finally:
            db.close()


def init_app(app):
    app.extensions["orbmesh_cut_users"] = CutUsers()
    if app.config["RECONCILE_CHECK_INTERVAL"] > 0:  # with the watcher, whose reconcile puts failures right
        app.extensions["orbmesh_limits_pusher"] = Pusher(app.config)
    # Counting runs beside the reconcile watcher (and, like it, not in tests that turn the watcher off).
    if app.config["USAGE_INTERVAL"] > 0 and app.config["RECONCILE_CHECK_INTERVAL"] > 0:
        collector = Collector(app.config, audit_log=app.extensions.get("orbmesh_audit"))
        app.extensions["orbmesh_usage"] = collector
        collector.start()


