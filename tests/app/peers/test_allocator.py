"""Address allocation: never a reserved address, wraps to freed ones, never scans the pool."""
import ipaddress

import pytest

from app.peers import store
from app.peers.allocator import Allocator, PoolExhausted
from app.peers.db import connect, init_schema, set_meta, write
from tests.conftest import make_key


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "alloc.db")
    init_schema(path)
    conn = connect(path)
    yield conn
    conn.close()


def _take(db, allocator, n, start=0):
    out = []
    for i in range(n):
        with write(db):
            addr = allocator.allocate(db)
            store.insert(db, {"public_key": make_key(start + i), "addr": addr, "user_id": "u",
                              "device_id": "d%d" % (start + i), "source": "client", "endpoint": None,
                              "keepalive": 0})
        out.append(str(ipaddress.IPv4Address(addr)))
    return out


def test_allocator_never_hands_out_reserved_addresses(db):
    allocator = Allocator("10.8.0.0/29", "10.8.0.1")
    assert allocator.size == 5
    assert _take(db, allocator, 5) == ["10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.5", "10.8.0.6"]
    with write(db), pytest.raises(PoolExhausted):
        allocator.allocate(db)
    assert allocator.free(db) == 0


def test_allocator_gateway_in_the_middle(db):
    allocator = Allocator("10.8.0.0/29", "10.8.0.4")
    assert sorted(_take(db, allocator, 5)) == ["10.8.0.1", "10.8.0.2", "10.8.0.3", "10.8.0.5", "10.8.0.6"]


def test_allocator_wraps_to_freed_addresses(db):
    allocator = Allocator("10.8.0.0/29", "10.8.0.1")
    _take(db, allocator, 5)
    db.execute("DELETE FROM peers WHERE addr = ?", (int(ipaddress.IPv4Address("10.8.0.3")),))
    assert _take(db, allocator, 1, start=50) == ["10.8.0.3"]


def test_allocator_does_not_scan_the_pool(db):
    """With 20,000 taken addresses, one allocation costs a handful of statements."""
    allocator = Allocator("10.8.0.0/16", "10.8.0.1")
    first = allocator.first + 1  # after the gateway
    with write(db):
        db.executemany("INSERT INTO peers (public_key, addr, user_id, device_id, source, keepalive, created_at,"
                       " updated_at) VALUES (?, ?, 'u', ?, 'client', 0, 0, 0)",
                       [(make_key(i), first + i, "d%d" % i) for i in range(20000)])
        set_meta(db, "next_addr", first + 20000)
    steps = []
    db.set_progress_handler(lambda: steps.append(1), 1000)
    with write(db):
        addr = allocator.allocate(db)
    db.set_progress_handler(None, 0)
    assert addr == first + 20000
    # A scan of 20,000 index entries would take well over 20 callbacks of 1,000 VM steps.
    assert len(steps) < 20


def test_after_a_wrap_the_run_at_the_start_is_walked_once_and_a_freed_address_below_it_is_still_found(db):
    allocator = Allocator("10.8.0.0/27", "10.8.0.1")  # .2 - .30
    _take(db, allocator, 29)
    for last in ("10.8.0.25", "10.8.0.26", "10.8.0.27"):  # freed after the run .2 - .24
        with write(db):
            store.delete(db, store.by_addr(db, int(ipaddress.IPv4Address(last))))
    assert _take(db, allocator, 1, start=100) == ["10.8.0.25"]  # the wrap walks the run once ...
    with write(db):
        set_meta(db, "next_addr", allocator.first)  # wrapped again
    walks = []
    db.set_trace_callback(lambda sql: walks.append(sql) if "NOT EXISTS" in sql else None)
    assert _take(db, allocator, 1, start=101) == ["10.8.0.26"]  # ... and starts after it next time
    db.set_trace_callback(None)
    # One jump, from .25 (the end of the last walk): not from .2 over the whole run again.
    assert len(walks) == 1 and "p.addr >= %d " % int(ipaddress.IPv4Address("10.8.0.25")) in walks[0]
    with write(db):
        store.delete(db, store.by_addr(db, int(ipaddress.IPv4Address("10.8.0.3"))))
    assert _take(db, allocator, 2, start=102) == ["10.8.0.27", "10.8.0.3"]
    with write(db), pytest.raises(PoolExhausted):
        allocator.allocate(db)
