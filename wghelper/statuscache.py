"""The `status` command's view of the interface, without a dump per call.

`wg show IF dump` is O(peers): about 0.1-0.2 s at 10,000 peers on
wireguard-go, far too slow for /health and /wireguard/status on every
probe (bench/read_paths.py).  The result is cached under a key of the
interface generation and the writer's change counter, both read before the
dump starts (every dump the helper makes is offered here, whichever command
made it: wghelper/handlers.py _dump), so the peer count is never older than the last change the
helper finished: any change finished after the key was read changes the key,
and the next call dumps again.  What can go stale are the traffic
counters: a cached value older than REFRESH seconds is still answered, and
one background dump refreshes it (stale-while-revalidate); past MAX_AGE the
caller waits for a fresh dump.  Concurrent callers share one dump.

A dump costs more the more peers there are (about 0.5 s of CPU at 60,000,
in the helper and wireguard-go): REFRESH and MAX_AGE grow so that the
background dumps take at most SHARE of a core (bench/profile.py).  The
writer's exact peer count (Writer.peer_count: the count after its last
finished `wg set`, also while the next one runs) lets the status command
key the cache by generation alone, so the counters are the only stale part.
"""
import logging
import threading
import time

log = logging.getLogger(__name__)

REFRESH = 1.0
MAX_AGE = 30.0
# Of one core, at most, for background dumps.  Small: on wireguard-go a dump holds the device's IPC
# lock until it is written out, so every `wg set` waits for it (about 1 s at 60,000 peers); the
# counters in status are up to MAX_AGE (then 3 x cost / SHARE) old at that size.  Below the app's
# usage.STALL_SHARE, so that at scale the usage counts' dumps (offered here) keep it fresh.
SHARE = 0.002


class StatusCache:
    def __init__(self, refresh=REFRESH, max_age=MAX_AGE, clock=time.monotonic):
        self.refresh, self.max_age, self.clock = refresh, max_age, clock
        self.dumps = 0
        self.cost = 0.0  # seconds the last dump took
        self._lock = threading.Lock()  # one dump at a time
        self._entry = None  # (key, taken_at, value)
        self._background = False

    def _fresh(self, key, age):
        entry = self._entry
        same = entry is not None and (entry[0] == key or key[-1] is None and entry[0][:-1] == key[:-1])
        return entry[2] if same and self.clock() - entry[1] < age else None

    def _ages(self):
        """(refresh, max_age) for the cost of the last dump."""
        refresh = max(self.refresh, self.cost / SHARE)
        return refresh, max(self.max_age, 3 * refresh)

    def get(self, key, compute):
        """compute() -> value, at most as old as described above; key: what invalidates it (a tuple; a
        last item None matches any value cached under the same other items)."""
        refresh, max_age = self._ages()
        value = self._fresh(key, refresh)
        stale = self._fresh(key, max_age) if value is None else None
        if stale is not None and not self._background:
            self._background = True  # a second thread starting too only costs one more dump
            # Its own thread because the dump blocks (1 s at 60,000 peers) and the stale value answers meanwhile.
            threading.Thread(target=self._refresh, args=(key, compute), name="status-refresh", daemon=True).start()
        value = value if value is not None else stale
        if value is not None:
            return value
        with self._lock:  # another caller may have just dumped
            return self._fresh(key, self._ages()[0]) or self._compute(key, compute)

    def offer(self, key, taken_at, value, cost):
        """A value from a dump another command made (usage, dump_peers, sync_peers): kept unless a newer one
        is, so status needs no dump of its own while others dump often enough.  Not under _lock, which a
        dump holds for its whole run: a race can keep the older of two values, whose counters are then one
        dump older, never its peer count (the key says which changes it saw)."""
        entry = self._entry
        if entry is None or taken_at > entry[1]:
            self.cost = cost
            self._entry = (key, taken_at, value)

    def _compute(self, key, compute):
        taken_at = self.clock()
        started = time.perf_counter()
        value = compute()
        self.cost = time.perf_counter() - started
        self.dumps += 1
        self._entry = (key, taken_at, value)
        return value

    def _refresh(self, key, compute):
        try:
            with self._lock:
                if self._fresh(key, self._ages()[0]) is None:
                    self._compute(key, compute)
        except Exception as exc:  # the next caller dumps in the foreground and sees the error
            log.debug("background status refresh failed: %s", exc)
        finally:
            self._background = False
