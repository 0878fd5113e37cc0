"""Fixtures for the app's unit tests: a real app and SQLite, a fake helper."""
import base64
import ipaddress
import os
import socket
import sqlite3
import sys

import pytest

from app import create_app
from app import helper as app_helper
from app.peers import db as database
from app.api.auth import mint_device_token
from app.helper import Addressing, HelperFailed, HelperUnavailable, Said, peer_spec, sync_spec
from wghelper.settings import address6

SECRET = "unit-test-secret-" + "x" * 32
API_KEYS = ["orbnet-key-one-0123456789", "orbnet-key-two-0123456789"]
SERVER_KEY = base64.b64encode(b"S" * 32).decode()
POOL6 = "fd00:8::/64"  # the fake helper's pool6, as a helper that made its unique-local pool announces it
BRIDGE_KEY = base64.b64encode(b"B" * 32).decode()
FAKE_BOOT = "12345678-aaaa-bbbb-cccc-1234567890ab"


def pytest_terminal_summary(terminalreporter):
    """The figures tests gave tests/fuzz_hooks.py report(), after the results."""
    # Looked up, not imported: importing it loads schemathesis, and when no
    # test imported it nothing was reported.
    hooks = sys.modules.get("tests.fuzz_hooks")
    if hooks is None:
        return
    for title, lines in hooks.reports().items():
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)


def make_key(seed):
    """A distinct, valid WireGuard public key for each seed (never all zero: a low-order point)."""
    return base64.b64encode((seed + 1).to_bytes(4, "big") * 8).decode()


class FakeHelper(Said):
    """Stands in for HelperClient: keeps peers in memory, records calls; what its hello said is kept as
    HelperClient keeps it (app/helper.py Said).

    Peers go in as store.Peer and are kept and recorded as the helper's wire
    format (app/helper.py peer_spec), as HelperClient would send them, with
    the pools hello announces (`pool6` None: IPv6 off).
    """

    def __init__(self, pool="10.8.0.0/16", gateway="10.8.0.1", pool6=POOL6, ipv6=None):
        gateway6 = pool6 and str(address6(ipaddress.ip_network(pool), ipaddress.ip_network(pool6),
                                          ipaddress.ip_address(gateway)))
        # ipv6: the helper's IPv6 mode (wghelper/ipv6.py): forward with a pool6, else off, unless given.
        self.pools = {"pool": pool, "gateway": gateway, "pool6": pool6, "gateway6": gateway6,
                      "ipv6": ipv6 or ("forward" if pool6 else "off")}
        self.peers = {}
        self.calls = []
        self.fail = None  # None, "unavailable" or "failed"
        self.generation = "gen-1"
        self.bridges = {}  # slot -> bridge_up arguments
        self.rules = {}    # client address -> slot
        self.handshakes = {}  # public key -> latest handshake (unix time), for dump()
        self.endpoints = {}   # public key -> where the interface saw it ("ip:port"), for dump() and sync()
        self.counters = {}    # public key -> (rx, tx) as the interface counts them, for usage()
        self.epoch = "7"      # the link's ifindex: a test changes it to "re-create" the interface
        self.taken_at = 1000.0
        self.limited = {}     # user -> the limits entry the helper holds
        self.over_quota = []  # users whose quota object in the helper's table is used up
        self.dump_seconds, self.dump_blocks = 0.001, True  # what usage() says its dump took and held
        self.sync_since = []  # the `since` of each sync, in order

    def _maybe_fail(self):
        if self.fail == "unavailable":
            raise HelperUnavailable()
        if self.fail == "failed":
            raise HelperFailed({"code": "COMMAND_FAILED", "message": "wg exited 1"})

    def hello(self):
        self.calls.append(("hello",))
        self._maybe_fail()
        return dict(self.pools, generation=self.generation, interface="wg0", public_key=SERVER_KEY,
                    running=True, listen_port=51820, mtu=1420, backend="wireguard-go",
                    bridge_public_key=BRIDGE_KEY, bridges=sorted(self.bridges))

    def addressing(self):
        return Addressing(self.pools)

    def status(self):
        self.calls.append(("status",))
        info = self.hello()
        info.update(peer_count=len(self.peers), rx_bytes=10, tx_bytes=20)
        return info

    def apply(self, add=(), remove=()):
        add = [peer_spec(p, self.addressing()) for p in add]
        self.calls.append(("apply", add, list(remove)))
        self._maybe_fail()
        for key in remove:
            self.peers.pop(key, None)
        for peer in add:
            self.peers[peer["public_key"]] = peer
        return {"applied": len(add), "removed": len(remove)}

    def dump(self):
        self.calls.append(("dump",))
        self._maybe_fail()
        return [{"public_key": key, "latest_handshake": self.handshakes.get(key, 0),
                 "endpoint": self.endpoints.get(key), "allowed_ips": list(peer["allowed_ips"]),
                 "keepalive": peer["keepalive"]} for key, peer in self.peers.items()]

    def dump_pages(self, limit=None):
        """As HelperClient.dump_pages, from one dump()."""
        limit = limit or app_helper.DUMP_PAGE
        peers = sorted(self.dump(), key=lambda p: p["public_key"])
        for start in range(0, len(peers), limit):
            page = peers[start:start + limit]
            yield page, page[-1]["public_key"] if start + limit < len(peers) else None
        if not peers:
            yield [], None

    def sync(self, peers, since=None):
        peers = [sync_spec(p, self.addressing()) for p in peers]
        self.calls.append(("sync", peers))
        self.sync_since.append(since)
        self._maybe_fail()
        self.peers = {p["public_key"]: p for p in peers}
        return {"added": 0, "removed": 0, "updated": 0, "endpoints": dict(self.endpoints)}

    def bridge_up(self, slot, public_key, endpoint, address, keepalive):
        self.calls.append(("bridge_up", slot, public_key, endpoint, address, keepalive))
        self._maybe_fail()
        self.bridges[slot] = (public_key, endpoint, address, keepalive)
        return {"interface": "wg0b%d" % slot, "table": 51900 + slot, "public_key": BRIDGE_KEY}

    def bridge_down(self, slot):
        self.calls.append(("bridge_down", slot))
        self._maybe_fail()
        self.bridges.pop(slot, None)
        self.rules = {a: s for a, s in self.rules.items() if s != slot}
        return {"interface": "wg0b%d" % slot}

    def bridge_rules(self, add=(), remove=(), exclusive=False):
        self.calls.append(("bridge_rules", list(add), list(remove), exclusive))
        self._maybe_fail()
        if exclusive:
            self.rules = {}
        for address in remove:
            self.rules.pop(address, None)
        for rule in add:
            self.rules[rule["address"]] = rule["slot"]
        return {"added": len(add), "removed": len(remove), "rules": len(self.rules)}


    def limits(self, users, replace=False):
        self.calls.append(("limits", [dict(u) for u in users], replace))
        self._maybe_fail()
        if replace:
            self.limited = {}
        for entry in users:
            if entry["addresses"] and ("rate_mbps" in entry or "quota" in entry):
                self.limited[entry["user"]] = dict(entry)
            else:
                self.limited.pop(entry["user"], None)
        return {"users": len(self.limited)}

    def usage(self, since=None, fresh=False):
        """Every peer's counters, in a sample one second newer than the last (the real helper answers only
        the peers that moved since `since`; all of them is what it answers a caller it cannot compare)."""
        self.calls.append(("usage", since, fresh))
        self._maybe_fail()
        self.taken_at += 1
        return {"boot": FAKE_BOOT, "epoch": self.epoch, "taken_at": self.taken_at, "complete": True,
                "dump_seconds": self.dump_seconds, "dump_blocks": self.dump_blocks, "over_quota": list(self.over_quota),
                "peers": [[key, *self.counters.get(key, (0, 0)), self.handshakes.get(key, 0), self.endpoints.get(key)]
                          for key in self.peers]}


class FakeResolver:
    """Stands in for app.resolver.Probe (the gateway's DNS resolver): answers unless `failure` is set."""

    address = "10.8.0.1"

    def __init__(self):
        self.failure = None

    def error(self):
        return self.failure


@pytest.fixture
def wireguard():
    """A UDP socket standing in for our WireGuard's listen port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.fixture
def settings(tmp_path):
    return {"DB_PATH": str(tmp_path / "orbmesh.db"), "HELPER_SOCKET": str(tmp_path / "helper.sock"),
            "JWT_SECRET": SECRET, "API_KEYS": API_KEYS, "PUBLIC_HOST": "198.51.100.1",
            "RECONCILE_CHECK_INTERVAL": 0, "TESTING": True}


@pytest.fixture
def app(settings, monkeypatch):
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    application = create_app(settings)
    application.extensions["orbmesh_helper"] = FakeHelper(application.config["POOL"], application.config["GATEWAY"])
    application.extensions["orbmesh_resolver"] = FakeResolver()
    yield application
    # A worker keeps its idle database connections and the audit log open for its life; one test
    # process makes hundreds of apps, which would otherwise run out of descriptors.
    for db in database._idle.pop((application.config["DB_PATH"], os.getpid()), []):
        db.close()
    audit = application.extensions.get("orbmesh_audit")
    if audit is not None:
        audit.close()


@pytest.fixture
def fake_helper(app):
    return app.extensions["orbmesh_helper"]


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def token(app):
    def mint(user="user-1", device="device-1", **kwargs):
        return mint_device_token(app.config, user, device, **kwargs)
    return mint


@pytest.fixture
def auth(token):
    def headers(user="user-1", device="device-1"):
        return {"Authorization": "Bearer " + token(user, device)}
    return headers


@pytest.fixture
def internal():
    return {"X-API-Key": API_KEYS[0]}


@pytest.fixture
def snapshot(app, fake_helper):
    """Everything a request could change: rows, meta and the helper's peers."""
    def take():
        db = sqlite3.connect(app.config["DB_PATH"])
        try:
            rows = db.execute("SELECT * FROM peers ORDER BY id").fetchall()
            meta = db.execute("SELECT * FROM meta ORDER BY key").fetchall()
        finally:
            db.close()
        return rows, meta, dict(fake_helper.peers)
    return take
