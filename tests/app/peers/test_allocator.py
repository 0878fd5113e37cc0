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
