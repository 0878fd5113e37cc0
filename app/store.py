"""SQLite state: peers and address allocation.

The database is the truth; the interface is made to match it.  Writers take
``BEGIN IMMEDIATE`` so allocation is serialised across gunicorn worker
processes, and a per-process lock in front of it so that, under gevent,
one greenlet waiting in SQLite's busy handler cannot stall the greenlet
that holds the lock in the same process.
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
    CHECK ((source = 'client') = (device_id IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS peers_device ON peers (user_id, device_id) WHERE source = 'client';
CREATE INDEX IF NOT EXISTS peers_user ON peers (user_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

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

    @property
    def address(self):
        return str(ipaddress.IPv4Address(self.addr))

    def helper_spec(self):
        """The peer as the helper's add/sync commands take it."""
        return {"public_key": self.public_key, "allowed_ips": [self.address + "/32"],
                "endpoint": self.endpoint, "keepalive": self.keepalive}


_COLUMNS = "id, public_key, addr, user_id, device_id, source, endpoint, keepalive, created_at, updated_at"


def connect(path):
    db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def init_schema(path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    db = connect(path)
    try:
        db.executescript(SCHEMA)
    finally:
        db.close()


def get_db():
    if "db" not in g:
        g.db = connect(current_app.config["DB_PATH"])
    return g.db


def close_db(exc=None):
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_app(app):
    init_schema(app.config["DB_PATH"])
    app.teardown_appcontext(close_db)


@contextlib.contextmanager
def write(db):
    """One serialised write transaction; rolls back on any exception."""
    with _write_lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


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


def count(db):
    return db.execute("SELECT count(*) FROM peers").fetchone()[0]


def insert(db, peer_fields):
    now = time.time()
    values = dict(peer_fields, created_at=now, updated_at=now)
    db.execute(
        "INSERT INTO peers (public_key, addr, user_id, device_id, source, endpoint, keepalive, created_at, updated_at)"
        " VALUES (:public_key, :addr, :user_id, :device_id, :source, :endpoint, :keepalive, :created_at, :updated_at)",
        values)
    return by_addr(db, values["addr"])


def restore(db, peer):
    """Put back a row exactly as it was (undo of a delete)."""
    db.execute("INSERT INTO peers (%s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" % _COLUMNS,
               (peer.id, peer.public_key, peer.addr, peer.user_id, peer.device_id, peer.source,
                peer.endpoint, peer.keepalive, peer.created_at, peer.updated_at))


def set_key(db, peer_id, old_key, new_key):
    cursor = db.execute("UPDATE peers SET public_key = ?, updated_at = ? WHERE id = ? AND public_key = ?",
                        (new_key, time.time(), peer_id, old_key))
    return cursor.rowcount == 1


def update_orbnet(db, peer_id, endpoint, keepalive):
    db.execute("UPDATE peers SET endpoint = ?, keepalive = ?, updated_at = ? WHERE id = ?",
               (endpoint, keepalive, time.time(), peer_id))


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
