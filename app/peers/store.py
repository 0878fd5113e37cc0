"""The rows: peers (Peer) and the bridges in use, and every query on them.

Call the changing queries inside db.write().  A client peer may be
quarantined (sweep.py), and every peer of a user the quota cut is held
(usage.py): their rows and addresses stay, but they are not on the
interface (live_peers leaves them out).
"""
import ipaddress
import socket
import time
from dataclasses import dataclass

from wghelper import validate


@dataclass(frozen=True)
class Peer:
    id: int
    public_key: str
    addr: int
    user_id: str
    device_id: str | None
    source: str
    endpoint: str | None
    keepalive: int
    created_at: float
    updated_at: float
    mode: str = "direct"
    exit_id: str | None = None
    # Set while a stale client peer is off the interface but keeps its address.
    quarantined_at: float | None = None
    # The newest handshake the stale-peer sweep has seen (survives interface re-creation).
    handshake_at: float | None = None
    # Where the interface last saw the peer (reconcile and the sweep read it from the helper): a peer put
    # back on an interface that lost it goes there, so the server can start the handshake.
    last_endpoint: str | None = None

    @property
    def address(self):
        return socket.inet_ntoa(self.addr.to_bytes(4, "big"))  # str(IPv4Address) at a tenth of the cost


_COLUMNS = ("id, public_key, addr, user_id, device_id, source, endpoint, keepalive, created_at, updated_at,"
            " mode, exit_id, quarantined_at, handshake_at, last_endpoint")


def _peer(row):
    return Peer(*row) if row else None


def by_device(db, user_id, device_id):
    return _peer(db.execute("SELECT %s FROM peers WHERE source = 'client' AND user_id = ? AND device_id = ?"
                            % _COLUMNS, (user_id, device_id)).fetchone())


def by_key(db, public_key):
    return _peer(db.execute("SELECT %s FROM peers WHERE public_key = ?" % _COLUMNS, (public_key,)).fetchone())


def by_addr(db, addr):
    return _peer(db.execute("SELECT %s FROM peers WHERE addr = ?" % _COLUMNS, (addr,)).fetchone())


def by_user(db, user_id):
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE user_id = ? ORDER BY id"
                                             % _COLUMNS, (user_id,))]


def count_devices(db, user_id):
    return db.execute("SELECT count(*) FROM peers WHERE source = 'client' AND user_id = ?", (user_id,)).fetchone()[0]


def all_peers(db):
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers ORDER BY addr" % _COLUMNS)]


# The peers that belong on the interface: not quarantined, and not of a user the quota cut.
ON_INTERFACE = "quarantined_at IS NULL AND user_id NOT IN (SELECT user_id FROM usage_users WHERE cut_at IS NOT NULL)"


def live_peers(db):
    """The peers that belong on the interface (ON_INTERFACE)."""
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE %s ORDER BY addr"
                                             % (_COLUMNS, ON_INTERFACE))]


def live_peers_between(db, after, through):
    """live_peers with a key after `after` and up to `through` (None: no bound), by key: a page of a walk
    (app/peers/drift.py), read through the key's index."""
    bounds = [(clause, key) for clause, key in (("public_key > ?", after), ("public_key <= ?", through))
              if key is not None]
    where = " AND ".join([clause for clause, _ in bounds] + [ON_INTERFACE])
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE %s" % (_COLUMNS, where),
                                             [key for _, key in bounds])]


def client_peers(db):
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE source = 'client' ORDER BY addr"
                                             % _COLUMNS)]


def client_peers_after(db, addr, limit):
    """The next `limit` client peers by address after `addr`: a slice of client_peers (app/sweep.py)."""
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE source = 'client' AND addr > ? "
                                             "ORDER BY addr LIMIT ?" % _COLUMNS, (addr, limit))]


def set_quarantined(db, peer_id, when):
    """Quarantine (when = a time) or release (when = None) a peer."""
    db.execute("UPDATE peers SET quarantined_at = ?, updated_at = ? WHERE id = ?", (when, time.time(), peer_id))


def set_handshake(db, peer_id, when):
    db.execute("UPDATE peers SET handshake_at = ? WHERE id = ?", (when, peer_id))


def set_endpoints(db, endpoints):
    """Remember where the interface saw peers: {public_key: "ip:port"} (unknown keys are ignored).

    What the helper would refuse as a last endpoint (broadcast, multicast,
    unspecified, malformed) is kept as NULL: it goes back with every sync,
    and one refused peer would fail the whole sync.
    """
    # Only what changed is checked (about 10 us an endpoint, under the
    # write lock; most peers are where they were at the last reconcile).
    # Only the keys given are read: a count of a few moved peers at 60,000
    # (app/usage.py, every few seconds) read the whole table (bench/profile.py).
    known = _last_endpoints(db, list(endpoints))
    db.executemany("UPDATE peers SET last_endpoint = ?1 WHERE public_key = ?2 AND last_endpoint IS NOT ?1",
                   [(sendable(endpoint, last=True), key) for key, endpoint in endpoints.items()
                    if key in known and known[key] != endpoint])


def _last_endpoints(db, keys, size=900):
    """{public_key: last_endpoint} of those of `keys` that have a row."""
    if len(keys) > 20000:  # most of the table: one scan beats many lookups
        return dict(db.execute("SELECT public_key, last_endpoint FROM peers"))
    known = {}
    for start in range(0, len(keys), size):
        part = keys[start:start + size]
        known.update(db.execute("SELECT public_key, last_endpoint FROM peers WHERE public_key IN (%s)"
                                % ", ".join("?" * len(part)), part))
    return known


def sendable(endpoint, last=False):
    """`endpoint` normalised if the helper accepts it (as a peer's last endpoint if `last`), else None."""
    try:
        return (validate.last_endpoint if last else validate.endpoint)(endpoint)
    except validate.Invalid:
        return None


def count(db):
    return db.execute("SELECT count(*) FROM peers").fetchone()[0]


def count_live_by_source(db):
    """{source: peers on the interface}; a source without any is left out."""
    return dict(db.execute("SELECT source, count(*) FROM peers WHERE %s GROUP BY source" % ON_INTERFACE)
                .fetchall())


def count_live(db):
    """count_live_by_source summed, without reading every row: every /health asks, and the scan took
    23 ms at 60,000 peers, stalling the worker's other requests (SQLite does not yield to gevent).  All
    rows (SQLite counts a table by its pages), less the quarantined (a partial index) and the live peers
    of the users the quota cut (by user)."""
    total = db.execute("SELECT count(*) FROM peers").fetchone()[0]
    held = db.execute("SELECT count(*) FROM peers WHERE quarantined_at IS NOT NULL").fetchone()[0]
    cut = db.execute("SELECT count(*) FROM peers WHERE quarantined_at IS NULL AND user_id IN "
                     "(SELECT user_id FROM usage_users WHERE cut_at IS NOT NULL)").fetchone()[0]
    return total - held - cut


def count_quarantined(db):
    return db.execute("SELECT count(*) FROM peers WHERE quarantined_at IS NOT NULL").fetchone()[0]


def insert(db, peer_fields):
    now = time.time()
    values = dict({"mode": "direct", "exit_id": None}, **peer_fields, created_at=now, updated_at=now)
    db.execute(
        "INSERT INTO peers (public_key, addr, user_id, device_id, source, endpoint, keepalive, created_at, updated_at,"
        " mode, exit_id) VALUES (:public_key, :addr, :user_id, :device_id, :source, :endpoint, :keepalive,"
        " :created_at, :updated_at, :mode, :exit_id)",
        values)
    return by_addr(db, values["addr"])


def restore(db, peer):
    """Put back a row exactly as it was (undo of a delete)."""
    db.execute("INSERT INTO peers (%s) VALUES (%s)" % (_COLUMNS, ", ".join("?" * len(_COLUMNS.split(",")))),
               (peer.id, peer.public_key, peer.addr, peer.user_id, peer.device_id, peer.source,
                peer.endpoint, peer.keepalive, peer.created_at, peer.updated_at, peer.mode, peer.exit_id,
                peer.quarantined_at, peer.handshake_at, peer.last_endpoint))


def delete(db, peer):
    cursor = db.execute("DELETE FROM peers WHERE id = ? AND public_key = ?", (peer.id, peer.public_key))
    return cursor.rowcount == 1


def set_key(db, peer_id, old_key, new_key):
    cursor = db.execute("UPDATE peers SET public_key = ?, updated_at = ? WHERE id = ? AND public_key = ?",
                        (new_key, time.time(), peer_id, old_key))
    return cursor.rowcount == 1


def update_orbnet(db, peer_id, endpoint, keepalive):
    db.execute("UPDATE peers SET endpoint = ?, keepalive = ?, updated_at = ? WHERE id = ?",
               (endpoint, keepalive, time.time(), peer_id))


def set_route(db, peer_id, mode, exit_id):
    """How the peer's traffic leaves: directly, or through the bridge to `exit_id`."""
    db.execute("UPDATE peers SET mode = ?, exit_id = ?, updated_at = ? WHERE id = ?",
               (mode, exit_id, time.time(), peer_id))


def bridged_peers(db):
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE mode = 'bridge' ORDER BY addr"
                                             % _COLUMNS)]


# --- bridges: one row per exit in use (slot -> interface and table in the helper)

def bridge_rows(db):
    """[(exit_id, slot, idle_since, clients)]"""
    return db.execute("SELECT b.exit_id, b.slot, b.idle_since, (SELECT count(*) FROM peers p WHERE p.mode = 'bridge'"
                      " AND p.exit_id = b.exit_id) FROM bridges b ORDER BY b.slot").fetchall()


def bridge_slot(db, exit_id, max_slots):
    """(slot, created): the exit's slot, the lowest free one for a new exit; (None, False) when all are taken."""
    row = db.execute("SELECT slot FROM bridges WHERE exit_id = ?", (exit_id,)).fetchone()
    if row:
        db.execute("UPDATE bridges SET idle_since = NULL WHERE exit_id = ?", (exit_id,))
        return row[0], False
    taken = {r[0] for r in db.execute("SELECT slot FROM bridges")}
    free = [n for n in range(max_slots) if n not in taken]
    if not free:
        return None, False
    db.execute("INSERT INTO bridges (exit_id, slot, idle_since) VALUES (?, ?, NULL)", (exit_id, free[0]))
    return free[0], True


def mark_bridge_idle(db, exit_id, now):
    db.execute("UPDATE bridges SET idle_since = ? WHERE exit_id = ? AND idle_since IS NULL AND NOT EXISTS"
               " (SELECT 1 FROM peers WHERE mode = 'bridge' AND exit_id = ?)", (now, exit_id, exit_id))


def delete_bridge(db, exit_id):
    db.execute("DELETE FROM bridges WHERE exit_id = ?", (exit_id,))



# --- the exits each device used lately (bridges.Bridges.admit) -----------------------

def recent_exits(db, user_id, since):
    """{device_id: exits} of the user: used since `since`, or routed through now."""
    rows = db.execute("SELECT device_id, exit_id FROM bridge_uses WHERE user_id = ? AND used_at >= ?"
                      " UNION SELECT device_id, exit_id FROM peers WHERE user_id = ? AND source = 'client'"
                      " AND mode = 'bridge'", (user_id, since, user_id))
    found = {}
    for device_id, exit_id in rows:
        found.setdefault(device_id, set()).add(exit_id)
    return found


def record_bridge_use(db, user_id, device_id, exit_ids, now, forget_before):
    """The device uses (or just left) `exit_ids` at `now`; uses from before `forget_before` go."""
    db.execute("DELETE FROM bridge_uses WHERE used_at < ?", (forget_before,))
    db.executemany("INSERT INTO bridge_uses (user_id, device_id, exit_id, used_at) VALUES (?, ?, ?, ?)"
                   " ON CONFLICT (user_id, device_id, exit_id) DO UPDATE SET used_at = excluded.used_at",
                   [(user_id, device_id, exit_id, now) for exit_id in exit_ids])
