"""Waiting for another process's write lock: in short cooperative sleeps, then SQLite's own error."""
import sqlite3
import threading
import time

import pytest

from app import store


@pytest.fixture
def path(tmp_path):
    path = str(tmp_path / "lock.db")
    store.init_schema(path)
    return path


def hold_lock(path, seconds):
    """Another connection (as another worker would) holds BEGIN IMMEDIATE for `seconds`."""
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    locked = threading.Event()

    def release():
        locked.set()
        threading.Event().wait(seconds)  # not time.sleep, which a test patches
        blocker.execute("ROLLBACK")
        blocker.close()

    thread = threading.Thread(target=release)
    thread.start()
    locked.wait()
    return thread


def test_write_waits_for_a_lock_released_in_time(path):
    db = store.connect(path)
    holder = hold_lock(path, 0.3)
    with store.write(db):
        store.set_meta(db, "k", "v")
    holder.join()
    assert store.get_meta(db, "k") == "v"
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 10000  # restored
    db.close()


def test_write_gives_up_after_the_busy_timeout_with_sqlites_error(path):
    db = store.connect(path)
    db.execute("PRAGMA busy_timeout = 100")
    holder = hold_lock(path, 1.0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with store.write(db):
                store.set_meta(db, "k", "v")
    finally:
        holder.join()
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 100
    assert store.get_meta(db, "k") is None
    db.close()


def test_waiting_sleeps_in_python_so_other_greenlets_can_run(path, monkeypatch):
    # Under gevent, time.sleep is a greenlet switch; SQLite's busy handler would block the process.
    slept = []
    real_sleep = time.sleep
    monkeypatch.setattr("app.store.time.sleep", lambda s: (slept.append(s), real_sleep(s)))
    db = store.connect(path)
    holder = hold_lock(path, 0.2)
    with store.write(db):
        pass
    holder.join()
    db.close()
    assert slept and max(slept) <= 0.005
