"""SQLite: the connection, the schema, write transactions, and the ``meta`` table.

The database is the truth; the interface is made to match it.  Writers take
``BEGIN IMMEDIATE`` so allocation is serialised across gunicorn worker
processes, and a per-process lock in front of it so that, under gevent,
one greenlet waiting in SQLite's busy handler cannot stall the greenlet
that holds the lock in the same process.  The wait for another process's
lock is done in write(), in sleeps that yield, for up to DB_BUSY_TIMEOUT.

The queries on peers and bridges are in store.py; address allocation is in
allocator.py.
"""
import contextlib
import os
import sqlite3
import threading
import time

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
CREATE TABLE IF NOT EXISTS bridge_uses (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    exit_id     TEXT NOT NULL,
    used_at     REAL NOT NULL,
    PRIMARY KEY (user_id, device_id, exit_id)
);
CREATE TABLE IF NOT EXISTS usage_users (
    user_id      TEXT PRIMARY KEY,
    rate_mbps    INTEGER,
    rate_from    TEXT CHECK (rate_from IN ('api', 'token')),
    quota_bytes  INTEGER,
    quota_from   TEXT CHECK (quota_from IN ('api', 'token')),
    period       INTEGER NOT NULL DEFAULT 0,
    period_start REAL NOT NULL,
    cut_at       REAL
);
CREATE INDEX IF NOT EXISTS usage_users_cut ON usage_users (user_id) WHERE cut_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS usage_devices (
    user_id      TEXT NOT NULL,
    source       TEXT NOT NULL CHECK (source IN ('client', 'orbnet')),
    device       TEXT NOT NULL,
    bytes_up     INTEGER NOT NULL DEFAULT 0,
    bytes_down   INTEGER NOT NULL DEFAULT 0,
    handshake_at REAL,
    transport    TEXT,
    tunnel       TEXT,
    PRIMARY KEY (user_id, source, device)
);
CREATE TABLE IF NOT EXISTS usage_seen (
    public_key  TEXT PRIMARY KEY,
    epoch       TEXT NOT NULL,
    rx          INTEGER NOT NULL,
    tx          INTEGER NOT NULL,
    user_id     TEXT NOT NULL,
    source      TEXT NOT NULL,
    device      TEXT NOT NULL,
    active_at   REAL
);
"""
# Columns added after the first release: (name, definition), added to older files at start.
ADDED_COLUMNS = (
    ("mode", "TEXT NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'bridge'))"),
    ("exit_id", "TEXT"),
    ("quarantined_at", "REAL"),
    ("handshake_at", "REAL"),
    ("last_endpoint", "TEXT"),
)
# Seconds SQLite itself may wait on a lock.  It waits in C, which would stall
# every greenlet of a gevent worker, so the long wait for the write lock is
# done in write() instead, in short sleeps that yield.
_C_BUSY_TIMEOUT = 0.05
DEFAULT_BUSY_TIMEOUT = 10.0

_write_lock = threading.RLock()


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
                # After the columns: an older file gets quarantined_at above.  For store.count_live.
                db.execute("CREATE INDEX IF NOT EXISTS peers_quarantined ON peers (quarantined_at) "
                           "WHERE quarantined_at IS NOT NULL")
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


# How long the undo of a failed change waits for the lock.  Longer than a
# write's: an undo that gave up would leave the change the caller was told
# failed (a reconcile holds the lock for a whole helper call, and the helper
# may be the reason the change failed).
UNDO_PATIENCE = 60.0
# Seconds beyond its own timeout a write waits for another write of this process (write()).
LOCAL_GRACE = 10.0


@contextlib.contextmanager
def write(db, patience=None):
    """One serialised write transaction; rolls back on any exception.  `patience`: seconds to wait for the
    lock instead of db.busy_timeout.

    The wait for this process's own lock is bounded too, by `patience` plus
    LOCAL_GRACE (then the wait for the database's lock starts): a reconcile whose commit failed while another
    process held the database waits up to UNDO_PATIENCE in undo(), holding
    it, and every request of the worker queued behind it without a bound (one
    waited past a client's 60 s).  The grace lets a holder finish one helper
    call (ORBMESH_HELPER_TIMEOUT, 5 s by default): a request behind it then
    meets the helper's own failure, not a busy database.
    """
    patience = getattr(db, "busy_timeout", DEFAULT_BUSY_TIMEOUT) if patience is None else patience
    if not _write_lock.acquire(timeout=patience + LOCAL_GRACE):
        raise sqlite3.OperationalError("database is locked: another write of this process held it past the timeout")
    try:
        _begin(db, time.monotonic() + patience)
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        _write_lock.release()


def undo(db):
    """write() for undoing a change whose second half failed: it waits UNDO_PATIENCE for the lock."""
    return write(db, patience=max(UNDO_PATIENCE, getattr(db, "busy_timeout", DEFAULT_BUSY_TIMEOUT)))


def _begin(db, deadline):
    """BEGIN IMMEDIATE, retried in yielding sleeps until `deadline` (time.monotonic()).

    SQLite's own busy handler sleeps inside the C call, stalling every
    greenlet of a gevent worker, and backs off to steps of up to 100 ms even
    when the lock is free again after one; under 50 concurrent connects
    across two workers that was most of the latency tail
    (bench/control_plane.py).  So SQLite does not wait here at all, and each
    retry sleeps 0.5-5 ms through time.sleep (a greenlet switch).  Past the
    deadline SQLite's "database is locked" goes up (a 503 for a request).
    """
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


def get_meta(db, key, default=None):
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(db, key, value):
    db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
               (key, str(value)))
