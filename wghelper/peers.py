"""Reading `wg show IF dump`, planning a sync and paging a dump: no privilege needed."""
import ipaddress
import itertools
import threading

from . import validate
from .errors import Invalid

# A peer put back on an interface that lost it goes to its last endpoint
# with this keepalive: the keepalive makes WireGuard start the handshake at
# once, instead of the client noticing after ~15 s.  The next sync sets the
# peer's own keepalive again (reconcile, within RECONCILE_INTERVAL).  Only
# there: a live peer's roamed endpoint is never overwritten (_differs).
RESTORE_KEEPALIVE = 25


def parse_dump(text):
    """Parse `wg show IF dump`; returns (interface fields, peers).

    The first line starts with the private key, which is dropped here and
    never returned or logged.
    """
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty wg dump")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise ValueError("unexpected wg dump header")
    info = {"public_key": None if head[1] == "(none)" else head[1], "listen_port": int(head[2])}
    peers = []
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) != 8:
            raise ValueError("unexpected wg dump peer line")
        peers.append({
            "public_key": f[0],
            "allowed_ips": [] if f[3] == "(none)" else f[3].split(","),
            "endpoint": None if f[2] == "(none)" else f[2],
            "latest_handshake": int(f[4]),
            "rx_bytes": int(f[5]),
            "tx_bytes": int(f[6]),
            "keepalive": 0 if f[7] == "off" else int(f[7]),
        })
    return info, peers


def _differs(have, want):
    try:
        current_ips = {str(ipaddress.ip_network(a, strict=False)) for a in have["allowed_ips"]}
    except ValueError:
        return True
    if current_ips != set(want["allowed_ips"]) or have["keepalive"] != want["keepalive"]:
        return True
    if want["endpoint"] is None:
        return False  # the peer's roamed endpoint is kept
    try:
        return validate.endpoint(have["endpoint"]) != want["endpoint"]
    except Invalid:
        return True


def plan_sync(current, desired, newer=None):
    """What to remove and add to turn `current` peers into `desired`; the
    result also says where the interface saw each peer ("endpoints").  The
    keys of `newer` ({key: added?}, Writer.changed_since) were changed after
    `desired` was read: while the interface shows what that change did (the
    key on it after an add, off it after a remove) they stay as they are, so a
    sync never undoes, even for a moment, a connect or disconnect that came
    after its snapshot.  An interface made again since has lost them: the
    sync then does its all."""
    have = {p["public_key"]: p for p in current}
    newer = {key for key, added in (newer or {}).items() if (key in have) == added}
    wanted = {p["public_key"] for p in desired}
    removes = [key for key in have if key not in wanted and key not in newer]
    adds = []
    added = updated = 0
    for peer in desired:
        old = have.get(peer["public_key"])
        if peer["public_key"] in newer:
            continue
        if old is None:
            added += 1
            back = peer.get("last_endpoint") and not peer["endpoint"]
            adds.append(dict(peer, endpoint=peer["last_endpoint"], keepalive=peer["keepalive"] or RESTORE_KEEPALIVE)
                        if back else peer)
        elif _differs(old, peer):
            updated += 1
            adds.append(peer)
    # Peers with an endpoint (seen lately, or given one) first: a sync goes on in slices (writer.SLICE),
    # and these are the devices in use; idle ones (no endpoint) can wait for the later slices.
    adds.sort(key=lambda p: p["endpoint"] is None)
    kept = len(newer & (have.keys() | wanted))
    return removes, adds, {"added": added, "removed": len(removes), "updated": updated, "kept": kept,
                           "endpoints": {key: p["endpoint"] for key, p in have.items() if p["endpoint"]}}


class Pages:
    """The dumps walks read a page at a time (``dump_peers`` with ``limit``: app/peers/drift.py), by key.

    At 60,000 peers a whole dump is a 10-13 MB answer that one worker
    decoded at once, its requests waiting and its RSS 12-22 MB higher after
    (docs/benchmarks.md); pages of a few thousand keep both small.  A dump
    is kept from a walk's first page to its last.  Two walks may overlap
    (the drift check's and, where usage is not counted, another worker's
    sweep), so KEEP dumps are kept and a new one drops the oldest; a page of
    a dump no longer kept is refused, and the app's next round syncs in full.
    """

    KEEP = 2

    def __init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._kept = {}  # id -> peers sorted by key, oldest first

    def keep(self, peers):
        """Keep `peers` (parse_dump's) for a walk; returns the dump's id."""
        ordered = sorted(peers, key=lambda p: p["public_key"])
        with self._lock:
            dump = next(self._ids)
            self._kept[dump] = ordered
            while len(self._kept) > self.KEEP:
                del self._kept[next(iter(self._kept))]
            return dump

    def page(self, dump, offset, limit):
        """{"peers": the `limit` after the first `offset` of dump `dump`, "dump", "total"}."""
        with self._lock:
            peers = self._kept.get(dump)
            if peers is None:
                raise Invalid("dump", "is no longer kept: start again from its first page")
            if offset + limit >= len(peers):
                del self._kept[dump]
        return {"peers": peers[offset:offset + limit], "dump": dump, "total": len(peers)}
