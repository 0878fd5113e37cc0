"""SQLite state: peers and address allocation.

The database is the truth; the interface is made to match it.  Writers take
``BEGIN IMMEDIATE`` so allocation is serialised across gunicorn worker
processes, and a per-process lock in front of it so that, under gevent,
one greenlet waiting in SQLite's busy handler cannot stall the greenlet
that holds the lock in the same process.  The wait for another process's
lock is done in write(), in sleeps that yield, for up to DB_BUSY_TIMEOUT.

A client peer may be quarantined (sweep.py): its row and address stay, but
it is not on the interface (live_peers leaves it out).
"""
import contextlib
import ipaddress
import os
import sqlite3
import threading
import time
from dataclasses import dataclass

from flask import current_app, g

SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    id          INTEGER PRIMARY KEY,
    public_key  TEXT NOT NULL UNIQUE,
    addr        INTEGER NOT NULL UNIQUE,
    user_id     TEXT NOT NULL,
    device_id   TEXT,
    source      TEXT NOT NULL CHECK (source IN ('client', 'orbnet')),
    endpoint    TEXT,
    keepalive   INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    quarantined_at REAL,
    handshake_at   REAL,
    CHECK ((source = 'client') = (device_id IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS peers_device ON peers (user_id, device_id) WHERE source = 'client';
CREATE INDEX IF NOT EXISTS peers_user ON peers (user_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bridges (
    exit_id     TEXT PRIMARY KEY,
    slot        INTEGER NOT NULL UNIQUE,
    idle_since  REAL
);
"""
# Columns added after the first release: (name, definition), added to older files at start.
ADDED_COLUMNS = (
    ("mode", "TEXT NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'bridge'))"),
    ("exit_id", "TEXT"),
    ("quarantined_at", "REAL"),
    ("handshake_at", "REAL"),
)
# Seconds SQLite itself may wait on a lock.  It waits in C, which would stall
# every greenlet of a gevent worker, so the long wait for the write lock is
# done in write() instead, in short sleeps that yield.
_C_BUSY_TIMEOUT = 0.05
DEFAULT_BUSY_TIMEOUT = 10.0

_write_lock = threading.RLock()


class PoolExhausted(Exception):
    pass


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

    @property
    def address(self):
        return str(ipaddress.IPv4Address(self.addr))

    def helper_spec(self):
        """The peer as the helper's add/sync commands take it."""
        return {"public_key": self.public_key, "allowed_ips": [self.address + "/32"],
                "endpoint": self.endpoint, "keepalive": self.keepalive}


_COLUMNS = ("id, public_key, addr, user_id, device_id, source, endpoint, keepalive, created_at, updated_at,"
            " mode, exit_id, quarantined_at, handshake_at")


class Connection(sqlite3.Connection):
    """A connection that knows how long write() may wait for the write lock."""
    busy_timeout = DEFAULT_BUSY_TIMEOUT


def connect(path, busy_timeout=DEFAULT_BUSY_TIMEOUT, sqlite_wait=_C_BUSY_TIMEOUT):
    db = sqlite3.connect(path, timeout=sqlite_wait, isolation_level=None, check_same_thread=False,
                         factory=Connection)
    db.busy_timeout = busy_timeout
    # WAL is a property of the file, set once by init_schema.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def init_schema(path):
    """Create or upgrade the schema and put the file in WAL mode; safe for workers starting together.

    Switching to WAL needs an exclusive lock, and while another worker is
    doing the same (or is opening the fresh WAL) SQLite can answer
    "database is locked" at once, without its busy wait: a gunicorn worker
    that let that escape failed to boot and took the master down with it.
    So the whole step is retried until DEFAULT_BUSY_TIMEOUT.  Two workers
    upgrading an older file at once used to race on ALTER TABLE too.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    deadline = time.monotonic() + DEFAULT_BUSY_TIMEOUT
    while True:
        # Nothing else runs in this process yet, so SQLite may wait in C.
        db = connect(path, sqlite_wait=DEFAULT_BUSY_TIMEOUT)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # One write transaction, so two workers cannot both see a column
            # missing and both add it.
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                have = {row[1] for row in db.execute("PRAGMA table_info(peers)")}
                for name, definition in ADDED_COLUMNS:
                    if name not in have:
                        db.execute("ALTER TABLE peers ADD COLUMN %s %s" % (name, definition))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() >= deadline:
                raise
        finally:
            db.close()
        time.sleep(0.05)


# Idle connections of this process, reused across requests: opening one
# (and its three PRAGMAs) was about a tenth of a connect's CPU in the app
# (bench/control_plane.py).  Keyed by path and pid, so a forked worker never
# uses its parent's.
_idle = {}
IDLE_MAX = 16


def get_db():
    if "db" not in g:
        path, busy = current_app.config["DB_PATH"], current_app.config["DB_BUSY_TIMEOUT"]
        pool = _idle.get((path, os.getpid()))
        db = pool.pop() if pool else connect(path, busy)
        db.busy_timeout = busy
        g.db = db
    return g.db


def close_db(exc=None):
    db = g.pop("db", None)
    if db is None:
        return
    try:
        if db.in_transaction:  # write() always ends its own; this is a safety net
            db.execute("ROLLBACK")
        pool = _idle.setdefault((current_app.config["DB_PATH"], os.getpid()), [])
        if len(pool) < IDLE_MAX:
            pool.append(db)
            return
    except sqlite3.Error:
        pass
    db.close()


def init_app(app):
    init_schema(app.config["DB_PATH"])
    app.teardown_appcontext(close_db)


@contextlib.contextmanager
def write(db):
    """One serialised write transaction; rolls back on any exception."""
    with _write_lock:
        _begin(db)
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _begin(db):
    """BEGIN IMMEDIATE, retried in yielding sleeps for up to db.busy_timeout.

    SQLite's own busy handler sleeps inside the C call, stalling every
    greenlet of a gevent worker, and backs off to steps of up to 100 ms even
    when the lock is free again after one; under 50 concurrent connects
    across two workers that was most of the latency tail
    (bench/control_plane.py).  So SQLite does not wait here at all, and each
    retry sleeps 0.5-5 ms through time.sleep (a greenlet switch).  Past the
    deadline SQLite's "database is locked" goes up (a 503 for a request).
    """
    deadline = time.monotonic() + getattr(db, "busy_timeout", DEFAULT_BUSY_TIMEOUT)
    delay = 0.0005
    waited_ms = db.execute("PRAGMA busy_timeout").fetchone()[0]
    db.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
    finally:
        db.execute("PRAGMA busy_timeout = %d" % waited_ms)


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


def live_peers(db):
    """The peers that belong on the interface (all but the quarantined)."""
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE quarantined_at IS NULL ORDER BY addr"
                                             % _COLUMNS)]


def client_peers(db):
    return [Peer(*row) for row in db.execute("SELECT %s FROM peers WHERE source = 'client' ORDER BY addr"
                                             % _COLUMNS)]


def set_quarantined(db, peer_id, when):
    """Quarantine (when = a time) or release (when = None) a peer."""
    db.execute("UPDATE peers SET quarantined_at = ?, updated_at = ? WHERE id = ?", (when, time.time(), peer_id))


def set_handshake(db, peer_id, when):
    db.execute("UPDATE peers SET handshake_at = ? WHERE id = ?", (when, peer_id))


def count(db):
    return db.execute("SELECT count(*) FROM peers").fetchone()[0]


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
                peer.quarantined_at, peer.handshake_at))


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


def delete(db, peer):
    cursor = db.execute("DELETE FROM peers WHERE id = ? AND public_key = ?", (peer.id, peer.public_key))
    return cursor.rowcount == 1


def get_meta(db, key, default=None):
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(db, key, value):
    db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
               (key, str(value)))


class Allocator:
    """Next-fit allocation over the pool, without materialising it.

    A cursor in ``meta`` remembers where the last address was handed out;
    the search walks forward through the index, jumping over each run of
    taken addresses with one query, and wraps once.  Usually that is one
    or two index lookups, whatever the pool size.
    """

    def __init__(self, pool, gateway):
        pool = ipaddress.IPv4Network(pool)
        self.first = int(pool.network_address) + 1
        self.last = int(pool.broadcast_address) - 1
        self.gateway = int(ipaddress.IPv4Address(gateway))
        self.size = self.last - self.first + 1 - (1 if self.first <= self.gateway <= self.last else 0)

    def allocate(self, db):
        """Return a free address (int); call inside write(). Raises PoolExhausted."""
        cursor = int(get_meta(db, "next_addr", self.first))
        if not self.first <= cursor <= self.last:
            cursor = self.first
        for start, stop in ((cursor, self.last), (self.first, cursor - 1)):
            addr = self._first_free(db, start, stop)
            if addr is not None:
                set_meta(db, "next_addr", addr + 1 if addr < self.last else self.first)
                return addr
        raise PoolExhausted()

    def _first_free(self, db, start, stop):
        addr = start
        while addr <= stop:
            if addr == self.gateway:
                addr += 1
                continue
            if db.execute("SELECT 1 FROM peers WHERE addr = ?", (addr,)).fetchone() is None:
                return addr
            addr = db.execute(
                "SELECT p.addr + 1 FROM peers p WHERE p.addr >= ? AND NOT EXISTS "
                "(SELECT 1 FROM peers q WHERE q.addr = p.addr + 1) ORDER BY p.addr LIMIT 1",
                (addr,)).fetchone()[0]
        return None

    def free(self, db):
        taken = db.execute("SELECT count(*) FROM peers WHERE addr BETWEEN ? AND ?",
                           (self.first, self.last)).fetchone()[0]
        return self.size - taken
