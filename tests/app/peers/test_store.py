"""The rows: peers and the bridges in use, and the queries on them."""
import pytest

from app.peers import store
from app.peers.db import connect, init_schema, write
from tests.conftest import make_key


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "store.db")
    init_schema(path)
    conn = connect(path)
    yield conn
    conn.close()


def add(db, n, source="client", user="u", **fields):
    values = {"public_key": make_key(n), "addr": 167772160 + n, "user_id": user,
              "device_id": "d%d" % n if source == "client" else None, "source": source, "endpoint": None,
              "keepalive": 0}
    values.update(fields)
    with write(db):
        return store.insert(db, values)


def test_a_deleted_row_is_restored_exactly(db):
    add(db, 2, mode="bridge", exit_id="exit-1")
    with write(db):
        store.set_endpoints(db, {make_key(2): "198.51.100.2:4500"})
    peer = store.by_key(db, make_key(2))
    assert peer.last_endpoint == "198.51.100.2:4500"
    assert store.by_device(db, "u", "d2") == store.by_key(db, make_key(2)) == store.by_addr(db, peer.addr) == peer
    assert (peer.address, peer.mode, peer.exit_id) == ("10.0.0.2", "bridge", "exit-1")
    with write(db):
        assert store.delete(db, peer) is True
        assert store.delete(db, peer) is False  # already gone
    assert store.by_key(db, make_key(2)) is None
    with write(db):
        store.restore(db, peer)
    assert store.by_key(db, make_key(2)) == peer


def test_last_endpoints_are_kept_per_key(db):
    add(db, 2)
    add(db, 3)
    with write(db):
        store.set_endpoints(db, {make_key(2): "192.0.2.9:1", make_key(99): "192.0.2.9:2"})  # 99: no such peer
    assert [(p.public_key, p.last_endpoint) for p in store.all_peers(db)] == [
        (make_key(2), "192.0.2.9:1"), (make_key(3), None)]


def test_a_last_endpoint_the_helper_would_refuse_is_not_kept(db):
    """It goes back with every sync, and the helper refuses a whole sync for one bad peer (issue 23)."""
    for n in range(2, 7):
        add(db, n, last_endpoint="192.0.2.1:1")
    with write(db):
        store.set_endpoints(db, {make_key(2): "255.255.255.255:1", make_key(3): "224.0.0.1:5",
                                 make_key(4): "0.0.0.0:9",
                                 # A tunnel client is seen at the app's socket on loopback: kept, the
                                 # interface goes back there when it was lost (docs/operations.md).
                                 make_key(5): "127.0.0.1:40000", make_key(6): "[2001:db8::7]:51820"})
    assert [p.last_endpoint for p in store.all_peers(db)] == [
        None, None, None, "127.0.0.1:40000", "[2001:db8::7]:51820"]


def test_sendable():
    assert store.sendable("198.51.100.1:51820") == "198.51.100.1:51820"
    assert store.sendable("[2001:DB8::1]:7") == "[2001:db8::1]:7"
    assert store.sendable(None) is None
    assert store.sendable("127.0.0.1:22") is None and store.sendable("127.0.0.1:22", last=True) == "127.0.0.1:22"
    assert store.sendable("255.255.255.255:1", last=True) is None


def test_key_change_and_delete_only_match_the_key_they_were_read_with(db):
    """A row changed since it was read (a concurrent rekey) is left alone."""
    peer = add(db, 2)
    with write(db):
        assert store.set_key(db, peer.id, make_key(2), make_key(3)) is True
        assert store.set_key(db, peer.id, make_key(2), make_key(4)) is False
        assert store.delete(db, peer) is False  # still holds the old key
    assert store.by_device(db, "u", "d2").public_key == make_key(3)


def test_quarantined_peers_are_counted_apart_and_off_the_live_list(db):
    client, quarantined = add(db, 2), add(db, 3)
    orbnet = add(db, 4, source="orbnet", user="orb")
    with write(db):
        store.set_quarantined(db, quarantined.id, 1000.0)
    assert [p.public_key for p in store.live_peers(db)] == [client.public_key, orbnet.public_key]
    assert [p.public_key for p in store.client_peers(db)] == [client.public_key, quarantined.public_key]
    assert store.count_live_by_source(db) == {"client": 1, "orbnet": 1}
    assert store.count_quarantined(db) == 1 and store.count(db) == 3 and store.count_devices(db, "u") == 2
    with write(db):
        store.set_quarantined(db, quarantined.id, None)  # released
    assert store.count_live_by_source(db) == {"client": 2, "orbnet": 1} and store.count_quarantined(db) == 0


def test_bridge_slots_are_the_lowest_free_and_kept_per_exit(db):
    with write(db):
        assert store.bridge_slot(db, "a", 2) == (0, True)
        assert store.bridge_slot(db, "b", 2) == (1, True)
        assert store.bridge_slot(db, "c", 2) == (None, False)  # all taken
        assert store.bridge_slot(db, "a", 2) == (0, False)  # the exit's own slot again
        store.delete_bridge(db, "a")
        assert store.bridge_slot(db, "c", 2) == (0, True)
    assert [row[:2] for row in store.bridge_rows(db)] == [("c", 0), ("b", 1)]


def test_a_bridge_goes_idle_only_without_clients_and_a_connect_wakes_it(db):
    peer = add(db, 2, mode="bridge", exit_id="a")
    with write(db):
        store.bridge_slot(db, "a", 4)
        store.mark_bridge_idle(db, "a", 500.0)
    assert store.bridge_rows(db) == [("a", 0, None, 1)]  # a client still uses it
    assert [p.public_key for p in store.bridged_peers(db)] == [peer.public_key]
    with write(db):
        store.set_route(db, peer.id, "direct", None)
        store.mark_bridge_idle(db, "a", 500.0)
        store.mark_bridge_idle(db, "a", 900.0)  # the first time it went idle counts
    assert store.bridge_rows(db) == [("a", 0, 500.0, 0)] and store.bridged_peers(db) == []
    with write(db):
        assert store.bridge_slot(db, "a", 4) == (0, False)
    assert store.bridge_rows(db) == [("a", 0, None, 0)]


def test_count_live_is_the_live_list_without_reading_it(db):
    """/health's count: rows less the quarantined less the live rows of users the quota cut."""
    for n in range(2, 12):
        add(db, n, user="u%d" % (n % 3))
    add(db, 20, source="orbnet", user="u1")
    with write(db):
        store.set_quarantined(db, store.by_key(db, make_key(3)).id, 1.0)  # u0, quarantined and cut: once
        store.set_quarantined(db, store.by_key(db, make_key(4)).id, 1.0)
        db.execute("INSERT INTO usage_users (user_id, period_start, cut_at) VALUES ('u0', 0, 5), ('u2', 0, NULL)")
    assert store.count_live(db) == len(store.live_peers(db)) == sum(store.count_live_by_source(db).values()) == 7
    assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'peers_quarantined'").fetchone()
