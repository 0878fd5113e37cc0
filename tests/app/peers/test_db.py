"""The database: the schema and its upgrades, waiting for the write lock, connections kept per process."""
import multiprocessing
import sqlite3
import threading
import time

import pytest

from app.peers import store
from app.peers.db import SCHEMA, connect, get_db, get_meta, init_schema, set_meta, undo, write
from tests.conftest import make_key


@pytest.fixture
def path(tmp_path):
    path = str(tmp_path / "busy.db")
    init_schema(path)
    return path


def hold_lock(path, seconds):
    """Another connection (as another process would) holds the write lock for `seconds`."""
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")

    def release():
        threading.Event().wait(seconds)  # not time.sleep, which a test patches
        blocker.execute("ROLLBACK")
        blocker.close()
    thread = threading.Thread(target=release)
    thread.start()
    return thread


# --- waiting for the write lock: in yielding sleeps, up to DB_BUSY_TIMEOUT ----------

def test_write_waits_for_a_lock_released_within_the_timeout(path):
    db = connect(path, busy_timeout=30)
    thread = hold_lock(path, 0.5)  # ten times SQLite's own 50 ms wait
    try:
        with write(db):
            set_meta(db, "k", "v")
        assert get_meta(db, "k") == "v"
    finally:
        thread.join()
        db.close()


def test_write_gives_up_after_the_timeout_and_leaves_no_transaction(path):
    db = connect(path, busy_timeout=0.2)
    thread = hold_lock(path, 1.0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with write(db):
                set_meta(db, "k", "never")
        assert not db.in_transaction
    finally:
        thread.join()
    with write(db):  # and the connection works once the lock is gone
        set_meta(db, "k", "later")
    assert get_meta(db, "k") == "later"
    db.close()


def test_an_undo_outwaits_a_lock_that_a_write_gives_up_on(path):
    """The undo of a failed change must not leave the change behind: a reconcile may hold the lock for a
    whole (slow) helper call, longer than DB_BUSY_TIMEOUT."""
    db = connect(path, busy_timeout=0.2)
    thread = hold_lock(path, 1.0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):  # control: a write gives up
            with write(db):
                set_meta(db, "k", "write")
        with undo(db):
            set_meta(db, "k", "undone")
    finally:
        thread.join()
    assert get_meta(db, "k") == "undone"
    db.close()


def test_a_write_gives_up_on_a_long_wait_of_this_process_too(path, monkeypatch):
    """A reconcile's undo may hold this process's lock for UNDO_PATIENCE while another process holds the
    database: a request's write still answers within its busy timeout (plus LOCAL_GRACE, 0.3 s here) instead
    of queueing behind it."""
    monkeypatch.setattr("app.peers.db.LOCAL_GRACE", 0.3)
    entered, leave = threading.Event(), threading.Event()

    def long_holder():
        holder = connect(path)
        with write(holder):
            entered.set()
            leave.wait(30)
        holder.close()
    thread = threading.Thread(target=long_holder)
    thread.start()
    db = connect(path, busy_timeout=0.2)
    try:
        assert entered.wait(10)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with write(db):
                set_meta(db, "k", "never")
        assert thread.is_alive() and not leave.is_set()  # it gave up while the other still held the lock
        assert not db.in_transaction
    finally:
        leave.set()
        thread.join()
    with write(db):
        set_meta(db, "k", "later")
    assert get_meta(db, "k") == "later"
    db.close()


def test_waiting_sleeps_in_python_so_other_greenlets_can_run(path, monkeypatch):
    # Under gevent, time.sleep is a greenlet switch; SQLite's busy handler would block the process.
    slept, me = [], threading.current_thread()
    real_sleep = time.sleep

    def sleep(seconds):  # time.sleep of the whole process: only this thread's count (a full run has others)
        if threading.current_thread() is me:
            slept.append(seconds)
        real_sleep(seconds)
    monkeypatch.setattr("app.peers.db.time.sleep", sleep)
    db = connect(path)
    thread = hold_lock(path, 0.5)
    try:
        with write(db):
            pass
    finally:
        thread.join()
        db.close()
    assert slept and max(slept) <= 0.005


def test_locked_database_is_a_clean_503(client, auth, app, snapshot):
    """Another process holds the write lock past the busy timeout: 503, nothing written."""
    before = snapshot()
    app.config["DB_BUSY_TIMEOUT"] = 0.2
    blocker = sqlite3.connect(app.config["DB_PATH"], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "DATABASE_UNAVAILABLE"
    assert snapshot() == before


# --- the schema: created and upgraded at start, by workers starting together ----------

def test_schema_setup_waits_for_another_process_at_start(tmp_path):
    """Workers start together: one may hold the lock while another upgrades the schema."""
    path = str(tmp_path / "start.db")
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("    quarantined_at REAL,\n    handshake_at   REAL,\n", ""))
    old.execute("PRAGMA journal_mode=WAL")
    old.close()
    thread = hold_lock(path, 0.5)
    try:
        init_schema(path)  # ALTER TABLE needs the write lock
    finally:
        thread.join()
    db = connect(path)
    assert {row[1] for row in db.execute("PRAGMA table_info(peers)")} >= {"quarantined_at", "handshake_at"}
    db.close()


def _init_at(path, barrier, errors):
    barrier.wait()
    try:
        init_schema(path)
    except Exception as exc:  # reported to the parent
        errors.put(repr(exc))


def test_workers_starting_together_all_get_the_schema(tmp_path):
    """Four processes open a fresh file at once, as gunicorn workers do: none may fail.

    Before init_schema retried, one of them could get "database is locked"
    from the switch to WAL, which fails a worker's boot.
    """
    ctx = multiprocessing.get_context("fork")
    for round_ in range(15):
        path = str(tmp_path / ("race%d.db" % round_))
        barrier, errors = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_init_at, args=(path, barrier, errors)) for _ in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
        assert errors.empty(), errors.get()
        db = connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


def test_an_existing_database_gains_mode_and_exit_columns(tmp_path):
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("CREATE TABLE IF NOT EXISTS bridges", "CREATE TABLE IF NOT EXISTS b_"))
    old.execute("INSERT INTO peers (public_key, addr, user_id, device_id, source, keepalive, created_at, updated_at)"
                " VALUES (?, 167772162, 'u', 'd', 'client', 0, 1, 1)", (make_key(1),))
    old.commit()
    old.close()
    init_schema(path)
    init_schema(path)  # twice: nothing to add the second time
    db = connect(path)
    try:
        (peer,) = store.all_peers(db)
    finally:
        db.close()
    assert (peer.public_key, peer.mode, peer.exit_id) == (make_key(1), "direct", None)


def test_older_database_gets_the_new_columns(tmp_path):
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("    quarantined_at REAL,\n    handshake_at   REAL,\n", ""))
    old.execute("INSERT INTO peers (public_key, addr, user_id, device_id, source, created_at, updated_at)"
                " VALUES ('k', 167772162, 'u', 'd', 'client', 1, 1)")
    old.commit()
    old.close()
    init_schema(path)
    db = connect(path)
    try:
        assert store.all_peers(db)[0].quarantined_at is None and store.all_peers(db)[0].last_endpoint is None
        assert [p.public_key for p in store.live_peers(db)] == ["k"]
    finally:
        db.close()


# --- connections kept per process ----------------------------------------------------

def test_database_connections_are_reused_and_left_clean(app):
    with app.app_context():
        first = get_db()
        first.execute("BEGIN")  # a request that somehow left a transaction open
    with app.app_context():
        second = get_db()
        assert second is first
        assert not second.in_transaction
