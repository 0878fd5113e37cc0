"""The peer lifecycle on its own: the route step of a connect, and every undo when a step fails."""
import pytest

from app.failures import BridgeUnavailable, Failure, InvalidInput
from app.peers import lifecycle, store
from app.peers.allocator import Allocator
from app.peers.db import connect, get_meta, init_schema, set_meta, write
from tests.conftest import BRIDGE_KEY, SERVER_KEY, FakeHelper, make_key

EXIT = {"id": "exit-1", "publicKey": make_key(77), "endpoint": "198.51.100.1:51820", "bridgeAddress": "10.9.255.1"}
KEY_A, KEY_B = make_key(1), make_key(2)


class Bridges:
    """Stands in for app/bridge/bridges.py Bridges: the exit it is told to choose, an exit that may not answer."""

    def __init__(self, exit=None, recommended=False, max_slots=4):
        self.exit, self.recommended, self.max_slots = exit, recommended, max_slots
        self.down = False
        self.opened = []

    def choose_exit(self, exit_id=None, force_direct=False):
        if exit_id:
            return dict(EXIT, id=exit_id), False
        return (None, False) if force_direct or self.exit is None else (self.exit, self.recommended)

    def admit(self, db, user_id, device_id, exit_id, current_exit=None):
        pass  # the exit limits are tested in tests/app/bridge/test_bridges.py

    def open(self, helper, exit, slot):
        self.opened.append((exit["id"], slot))
        if self.down:
            raise BridgeUnavailable("Exit server %s cannot be reached" % exit["id"])


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "peers.db")
    init_schema(path)
    conn = connect(path)
    yield conn
    conn.close()


@pytest.fixture
def helper():
    """A helper whose hello the worker already holds (as after its first request), so calls list only steps."""
    fake = FakeHelper()
    fake.said()
    fake.calls.clear()
    return fake


def connect_device(db, helper, bridges, device="d1", key=KEY_A, **options):
    return lifecycle.connect_device(db, helper, Allocator("10.8.0.0/24", "10.8.0.1"), bridges, "u", device, key,
                                **options)


def rows(db):
    return [(p.public_key, p.address, p.mode, p.exit_id, p.quarantined_at) for p in store.all_peers(db)]


def fail_apply(helper):
    """The helper refuses apply_peers (and only that) from now on."""
    def refuse(*args, **kwargs):
        helper.fail = "failed"
        try:
            return FakeHelper.apply(helper, *args, **kwargs)
        finally:
            helper.fail = None
    helper.apply = refuse


def test_a_direct_connect_takes_no_bridge_step(db, helper):
    bridges = Bridges()
    peer = connect_device(db, helper, bridges)
    assert (peer.mode, peer.exit_id, peer.address) == ("direct", None, "10.8.0.2")
    assert bridges.opened == [] and [c[0] for c in helper.calls] == ["apply"]
    assert store.bridge_rows(db) == []


def test_a_bridged_connect_opens_the_exit_and_routes_before_the_peer_is_on(db, helper):
    bridges = Bridges()
    peer = connect_device(db, helper, bridges, exit_id="exit-1")
    assert (peer.mode, peer.exit_id) == ("bridge", "exit-1")
    assert bridges.opened == [("exit-1", 0)]
    assert [c[0] for c in helper.calls] == ["bridge_rules", "apply"] and helper.rules == {"10.8.0.2": 0}


def test_an_exit_asked_for_that_fails_is_an_error_and_leaves_nothing(db, helper):
    bridges = Bridges()
    bridges.down = True
    with pytest.raises(Failure) as info:
        connect_device(db, helper, bridges, exit_id="exit-1")
    assert info.value.code == "BRIDGE_UNAVAILABLE"
    assert rows(db) == [] and helper.peers == {} and helper.rules == {}
    assert store.bridge_rows(db) == [("exit-1", 0, 0, 0)]  # idle at once, for the watcher to release


def test_a_recommended_exit_that_fails_gives_a_direct_tunnel(db, helper):
    bridges = Bridges(exit=EXIT, recommended=True)
    bridges.down = True
    peer = connect_device(db, helper, bridges)
    assert (peer.mode, peer.exit_id) == ("direct", None)
    assert bridges.opened == [("exit-1", 0)]
    assert rows(db) == [(KEY_A, peer.address, "direct", None, None)] and list(helper.peers) == [KEY_A]
    assert helper.rules == {}


def test_no_free_bridge_slot_is_refused_before_anything_is_opened(db, helper):
    with write(db):
        store.bridge_slot(db, "exit-0", 1)  # another exit holds the only slot
    bridges = Bridges(max_slots=1)
    with pytest.raises(Failure) as info:
        connect_device(db, helper, bridges, exit_id="exit-1")
    assert info.value.code == "BRIDGE_UNAVAILABLE" and "no free bridge slot" in info.value.message
    assert rows(db) == [] and bridges.opened == [] and helper.calls == []
    recommending = Bridges(exit=EXIT, recommended=True, max_slots=1)
    assert connect_device(db, helper, recommending).mode == "direct"  # SmartConnect's pick: direct instead


def test_a_failed_switch_from_bridge_to_direct_keeps_the_bridge_route(db, helper):
    bridges = Bridges()
    connect_device(db, helper, bridges, exit_id="exit-1")
    before = rows(db)
    fail_apply(helper)
    with pytest.raises(Failure):
        connect_device(db, helper, bridges, force_direct=True)
    assert rows(db) == before and helper.rules == {"10.8.0.2": 0}
    assert store.bridge_rows(db) == [("exit-1", 0, None, 1)]  # still in use, not idle


def test_a_quarantined_device_whose_reconnect_fails_stays_quarantined(db, helper):
    connect_device(db, helper, Bridges())
    peer = store.by_key(db, KEY_A)
    with write(db):
        store.set_quarantined(db, peer.id, 1000.0)
    helper.peers.clear()  # the sweep took it off the interface
    before = rows(db)
    helper.fail = "unavailable"
    with pytest.raises(Failure):
        connect_device(db, helper, Bridges(), key=KEY_B)
    assert rows(db) == before == [(KEY_A, "10.8.0.2", "direct", None, 1000.0)]
    helper.fail = None
    peer = connect_device(db, helper, Bridges(), key=KEY_B)  # the control: it comes back, same address
    assert (peer.address, peer.quarantined_at) == ("10.8.0.2", None)
    assert helper.calls[-1] == ("apply", [helper.peers[KEY_B]], [])  # its old key was off already


def test_a_failed_helper_call_asks_for_a_full_reconcile(db, helper):
    with write(db):
        set_meta(db, "reconciled_generation", "gen-1")
    connect_device(db, helper, Bridges())
    assert get_meta(db, "reconciled_generation") == "gen-1"
    helper.fail = "failed"
    with pytest.raises(Failure):
        connect_device(db, helper, Bridges(), device="d2", key=KEY_B)
    # The helper may have applied the peer before its answer was lost.
    assert get_meta(db, "reconciled_generation") == ""


def test_a_failed_orbnet_update_puts_the_old_endpoint_back(db, helper):
    data = {"assignedIP": "10.8.0.42", "publicKey": KEY_A, "userUuid": "orb", "endpoint": "203.0.113.5:51820",
            "noKeepalive": False}
    lifecycle.add_orbnet_peer(db, helper, {"KEEPALIVE": 25}, data)
    before = rows(db), store.by_key(db, KEY_A).endpoint
    helper.fail = "failed"
    with pytest.raises(Failure):
        lifecycle.add_orbnet_peer(db, helper, {"KEEPALIVE": 25}, dict(data, endpoint="203.0.113.9:4000",
                                                                   noKeepalive=True))
    peer = store.by_key(db, KEY_A)
    assert (rows(db), peer.endpoint) == before and peer.keepalive == 25
    helper.fail = None
    lifecycle.add_orbnet_peer(db, helper, {"KEEPALIVE": 25}, dict(data, endpoint="203.0.113.9:4000", noKeepalive=True))
    assert (store.by_key(db, KEY_A).endpoint, helper.peers[KEY_A]["keepalive"]) == ("203.0.113.9:4000", 0)


@pytest.mark.parametrize("own", [SERVER_KEY, BRIDGE_KEY])
def test_the_servers_own_keys_are_refused_from_the_held_hello(db, helper, own):
    """Root would refuse them too; the app knows them from the hello it holds and asks nothing."""
    with pytest.raises(InvalidInput) as info:
        connect_device(db, helper, Bridges(), key=own)
    assert info.value.details == {"fields": {"publicKey": [lifecycle.OWN_KEY]}}
    assert rows(db) == [] and helper.calls == []
    assert connect_device(db, helper, Bridges()).public_key == KEY_A  # the control: another key connects
