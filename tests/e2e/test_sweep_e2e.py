"""The stale-peer sweep on the real stack, with short settings: a client that
keeps handshaking stays, idle ones are quarantined (off the interface, address
held) and then freed, OrbNET's peer is never touched, and a device that comes
back during quarantine gets its own address again.  Two workers: each event is
done (and audited) once.
"""
import ipaddress
import json
import sqlite3
import time

import pytest

from .netns import unique_ifname
from .wgclient import WgClient, keypair

pytestmark = pytest.mark.e2e

STALE, QUARANTINE = 8, 6


@pytest.fixture
def stack_env():
    return {"ORBMESH_STALE_AFTER": str(STALE), "ORBMESH_QUARANTINE": str(QUARANTINE),
            "ORBMESH_SWEEP_INTERVAL": "1"}


def rows(stack):
    db = sqlite3.connect(stack.env["ORBMESH_DB_PATH"])
    try:
        found = db.execute("SELECT public_key, addr, quarantined_at FROM peers").fetchall()
    finally:
        db.close()
    return {key: (str(ipaddress.IPv4Address(addr)) + "/32", quarantined) for key, addr, quarantined in found}


class Handshaker:
    """A real client that makes a fresh handshake every couple of seconds.

    WireGuard only re-handshakes every two minutes on its own; dropping and
    re-adding the server peer on the client forces the next packet to start
    a new one, which is what an app reconnecting often looks like.
    """

    def __init__(self, stack):
        self.client = WgClient(stack.client, unique_ifname("omcs"))
        self.body = None
        self.last = 0.0

    def connect(self, stack, user, device):
        status, self.body = stack.connect(user, device, self.client.public_key)
        assert status == 200, self.body
        b = self.body
        self.client.configure(server_public_key=b["serverPublicKey"], endpoint=b["serverEndpoint"],
                              address_cidr=b["ip"], allowed_ips=b["allowedIPs"], mtu=b["mtu"])

    def refresh(self):
        if time.monotonic() - self.last < 2:
            return
        ns, ifname, b = self.client.ns, self.client.ifname, self.body
        ns.run("wg", "set", ifname, "peer", b["serverPublicKey"], "remove")
        ns.run("wg", "set", ifname, "peer", b["serverPublicKey"], "endpoint", b["serverEndpoint"],
               "allowed-ips", ",".join(b["allowedIPs"]))
        assert self.client.ping(b["gateway"], count=1, timeout=3), "active client lost its tunnel"
        self.last = time.monotonic()


def wait_while_active(active, predicate, what, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        active.refresh()
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.2)


def test_idle_peers_are_quarantined_then_freed_active_and_orbnet_stay(stack):
    active = Handshaker(stack)
    try:
        active.connect(stack, "sweep", "active")
        active_key = active.client.public_key
        idle_key, back_key = keypair()[1], keypair()[1]
        status, idle = stack.connect("sweep", "idle", idle_key)
        status2, back = stack.connect("sweep", "back", back_key)
        assert (status, status2) == (200, 200)
        orbnet_key = keypair()[1]
        status, _ = stack.call("POST", "/wireguard/add-peer", {
            "userUuid": "orb-1", "publicKey": orbnet_key, "allowedIPs": "10.8.250.1/32",
            "assignedIP": "10.8.250.1"}, api_key=stack.api_key)
        assert status == 200

        wait_while_active(active, lambda: rows(stack)[idle_key][1] and rows(stack)[back_key][1],
                          "both idle peers quarantined")
        live, held = stack.wg_peers(), rows(stack)
        assert idle_key not in live and back_key not in live
        assert held[idle_key][0] == idle["ip"] and held[back_key][0] == back["ip"]  # addresses held
        assert active_key in live and orbnet_key in live

        status, again = stack.connect("sweep", "back", back_key)  # back during quarantine
        assert status == 200 and again["ip"] == back["ip"]
        assert back_key in stack.wg_peers() and rows(stack)[back_key][1] is None

        wait_while_active(active, lambda: idle_key not in rows(stack), "the idle peer freed")
        live, held = stack.wg_peers(), rows(stack)
        assert active_key in live and orbnet_key in live and held[back_key][0] == back["ip"]
        assert active.client.ping("10.8.0.1", count=1, timeout=3)

        events = [json.loads(line) for line in (stack.tmp / "audit.log").read_text().splitlines()]
        swept = [(e["event"], e["peer"]["public_key"]) for e in events if e["actor"] == {"type": "system"}
                 and e["event"] in ("quarantine", "free")]
        assert swept.count(("quarantine", idle_key)) == 1 and swept.count(("free", idle_key)) == 1
        assert swept.count(("quarantine", back_key)) == 1
        assert not [k for _, k in swept if k in (active_key, orbnet_key)]
        assert [e["released_from_quarantine"] for e in events
                if e["event"] == "connect" and e["peer"]["public_key"] == back_key] == [False, True]
    finally:
        active.client.close()
