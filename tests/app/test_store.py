"""Waiting for the database write lock: in yielding sleeps, up to DB_BUSY_TIMEOUT."""
import sqlite3
import threading
import time

import pytest

from app import store


@pytest.fixture
def path(tmp_path):
    path = str(tmp_path / "busy.db")
    store.init_schema(path)
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


def test_write_waits_for_a_lock_released_within_the_timeout(path):
    db = store.connect(path, busy_timeout=30)
    thread = hold_lock(path, 0.5)  # ten times SQLite's own 50 ms wait
    try:
        with store.write(db):
            store.set_meta(db, "k", "v")
        assert store.get_meta(db, "k") == "v"
    finally:
        thread.join()
        db.close()


def test_write_gives_up_after_the_timeout_and_leaves_no_transaction(path):
    db = store.connect(path, busy_timeout=0.2)
    thread = hold_lock(path, 1.0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with store.write(db):
                store.set_meta(db, "k", "never")
        assert not db.in_transaction
    finally:
        thread.join()
    with store.write(db):  # and the connection works once the lock is gone
        store.set_meta(db, "k", "later")
    assert store.get_meta(db, "k") == "later"
    db.close()


def test_schema_setup_waits_for_another_process_at_start(tmp_path):
    """Workers start together: one may hold the lock while another upgrades the schema."""
    path = str(tmp_path / "start.db")
    old = sqlite3.connect(path)
    old.executescript(store.SCHEMA.replace("    quarantined_at REAL,\n    handshake_at   REAL,\n", ""))
    old.execute("PRAGMA journal_mode=WAL")
    old.close()
    thread = hold_lock(path, 0.5)
    try:
        store.init_schema(path)  # ALTER TABLE needs the write lock
    finally:
        thread.join()
    db = store.connect(path)
    assert {row[1] for row in db.execute("PRAGMA table_info(peers)")} >= {"quarantined_at", "handshake_at"}
    db.close()


def test_waiting_sleeps_in_python_so_other_greenlets_can_run(path, monkeypatch):
    # Under gevent, time.sleep is a greenlet switch; SQLite's busy handler would block the process.
    slept = []
    real_sleep = time.sleep
    monkeypatch.setattr("app.store.time.sleep", lambda s: (slept.append(s), real_sleep(s)))
    db = store.connect(path)
    thread = hold_lock(path, 0.2)
    try:
        with store.write(db):
            pass
    finally:
        thread.join()
        db.close()
    assert slept and max(slept) <= 0.005


def _init_at(path, barrier, errors):
    barrier.wait()
    try:
        store.init_schema(path)
    except Exception as exc:  # reported to the parent
        errors.put(repr(exc))


def test_workers_starting_together_all_get_the_schema(tmp_path):
    """Four processes open a fresh file at once, as gunicorn workers do: none may fail.

    Before init_schema retried, one of them could get "database is locked"
    from the switch to WAL, which fails a worker's boot.
    """
    import multiprocessing

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
        db = store.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
