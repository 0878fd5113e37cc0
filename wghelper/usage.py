"""Per-peer byte counters for the app's usage accounting (the ``usage`` command).

The app counts usage as deltas of the interface's per-peer counters
(app/peers/usage.py); this module hands it the counters, read with the same
``wg show dump`` as every other reader of the interface: each dump the
helper makes, for whichever command, is kept here and in the status cache
(wghelper/handlers.py ``_dump``), so /health, the drift check, the sweep
and the accounting share dumps.

A sample is stamped with the host's monotonic clock (``taken_at``), the
boot it belongs to and the interface's epoch (its ifindex: a link deleted
and made again has another, and its counters start from zero; a helper
that adopts the link after a restart keeps it).  An answer carries only
the peers whose counters, handshake or endpoint changed after the caller's
last sample (``since``): at 10,000 peers most are idle, and the app
compares few.  A sample older than a newer one is never answered, so
samples reach the app in order.

A sample is answered as it is while younger than REFRESH, or than REUSE
times what its dump took (10-15 s at 60,000 peers on wireguard-go, where
each dump holds every change of the interface for 1-1.5 s): so the count
that follows another reader's dump in the same round (the app's drift
check, then its sweep: app/peers/reconcile.py Watcher.round) is counted
from that dump instead of making a second one.

A peer that has never moved a byte, made a handshake or had an endpoint
(IDLE) is not a change when it first appears: the app counts a peer it has
no baseline for from zero anyway (and forgets the baseline of a peer it
takes off), so after a bulk add, a helper restart or a new link the answer
does not carry every idle peer (50,000 rows and 0.4-0.8 s of a worker at
60,000 peers; docs/benchmarks.md).
"""
import threading
import time

BOOT_ID = "/proc/sys/kernel/random/boot_id"
REFRESH = 1.0  # a sample younger than this is answered as it is
REUSE = 10.0   # ... or younger than this many times what its dump took
IDLE = (0, 0, 0, None)  # rx, tx, latest handshake, endpoint of a peer that never did anything
NEVER = 0.0  # the "changed at" of a peer that never changed: before any sample's taken_at


def read_boot_id(path=BOOT_ID):
    with open(path, encoding="ascii") as handle:
        return handle.read().strip()


class Samples:
    def __init__(self, boot, clock=time.monotonic, refresh=REFRESH):
        self.boot, self.clock, self.refresh = boot, clock, refresh
        self._lock = threading.Lock()
        self._dumping = threading.Lock()  # one dump at a time; the others wait for it
        self.taken_at = None
        self.epoch = None
        self.dump_seconds = 0.0
        self._peers = {}    # key -> (rx, tx, handshake, endpoint)
        self._changed = {}  # key -> taken_at of the sample where its values last changed

    def record(self, taken_at, epoch, peers, seconds=0.0):
        """Keep a dump (peers as parse_dump gives them) taken at `taken_at`, unless a newer one is kept."""
        values = {p["public_key"]: (p["rx_bytes"], p["tx_bytes"], p["latest_handshake"], p["endpoint"])
                  for p in peers}
        with self._lock:
            if self.taken_at is not None and taken_at <= self.taken_at:
                return
            if epoch != self.epoch:
                self._changed = {}
            self._changed = {key: self._changed_at(key, value, taken_at) for key, value in values.items()}
            self._peers, self.taken_at, self.epoch = values, taken_at, epoch
            self.dump_seconds = seconds

    def _changed_at(self, key, value, taken_at):
        before = self._peers.get(key)
        if before == value or value == IDLE and before is None:
            return self._changed.get(key, NEVER if value == IDLE else taken_at)
        return taken_at

    def sample(self, dump, since=None, fresh=False, over_quota=None):
        """The counters changed after `since` ({"boot", "taken_at"}; None: all), from a sample no older than
        _reuse() (or, `fresh`, one begun after this call).  dump() -> (epoch, peers) makes a new one;
        over_quota() -> the users whose quota object in the nftables table is used up (wghelper/limits.py),
        asked every time."""
        asked = self.clock()
        if fresh or self._age() >= self._reuse():
            with self._dumping:
                # Fresh: from a dump that began after the caller asked.  Callers that waited here for
                # the same dump share the next one (the app settles before each disconnect, and on
                # wireguard-go each dump holds every change: 0.7-1 s at 60,000 peers).
                if fresh and not (self.taken_at is not None and self.taken_at > asked) or \
                        self._age() >= self._reuse():
                    taken_at = self.clock()
                    started = time.perf_counter()
                    epoch, peers = dump()
                    self.record(taken_at, epoch, peers, time.perf_counter() - started)
        started = time.perf_counter()
        over = over_quota() if over_quota is not None else []
        with self._lock:
            after = since["taken_at"] if since and since["boot"] == self.boot else None
            rows = [[key, *values] for key, values in self._peers.items()
                    if after is None or self._changed[key] > after]
            return {"boot": self.boot, "epoch": self.epoch, "taken_at": self.taken_at, "complete": after is None,
                    "dump_seconds": round(self.dump_seconds + time.perf_counter() - started, 4), "peers": rows,
                    "over_quota": over}

    def _reuse(self):
        """How old a sample may be and still be answered to a caller that does not ask for a fresh one."""
        return max(self.refresh, REUSE * self.dump_seconds)

    def _age(self):
        return float("inf") if self.taken_at is None else self.clock() - self.taken_at
