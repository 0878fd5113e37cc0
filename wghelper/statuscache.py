"""The `status` command's view of the interface, without a dump per call.

`wg show IF dump` is O(peers): about 0.1-0.2 s at 10,000 peers on
wireguard-go, far too slow for /health and /wireguard/status on every
probe (bench/read_paths.py).  The result is cached under a key of the
interface generation and the writer's change counter, both read before the
dump starts, so the peer count is never older than the last change the
helper made: any change finished after the key was read changes the key,
and the next call dumps again.  What can go stale are the traffic
counters: a cached value older than REFRESH seconds is still answered, and
one background dump refreshes it (stale-while-revalidate); past MAX_AGE the
caller waits for a fresh dump.  Concurrent callers share one dump.
"""
import logging
import threading
import time

log = logging.getLogger(__name__)

REFRESH = 1.0
MAX_AGE = 30.0


class StatusCache:
    def __init__(self, refresh=REFRESH, max_age=MAX_AGE, clock=time.monotonic):
        self.refresh = refresh
        self.max_age = max_age
        self.clock = clock
        self.dumps = 0
        self._lock = threading.Lock()  # one dump at a time
        self._flag = threading.Lock()  # guards _background only; never held during a dump
        self._entry = None  # (key, taken_at, value)
        self._background = False

    def get(self, key, compute):
        """compute() -> value, at most as old as described above; key: what invalidates it."""
        entry = self._entry
        if entry is not None and entry[0] == key:
            age = self.clock() - entry[1]
            if age < self.refresh:
                return entry[2]
            if age < self.max_age:
                self._refresh_in_background(key, compute)
                return entry[2]
        with self._lock:
            entry = self._entry  # another caller may have just dumped
            if entry is not None and entry[0] == key and self.clock() - entry[1] < self.refresh:
                return entry[2]
            return self._compute(key, compute)

    def _compute(self, key, compute):
        taken_at = self.clock()
        value = compute()
        self.dumps += 1
        self._entry = (key, taken_at, value)
        return value

    def _refresh_in_background(self, key, compute):
        with self._flag:
            if self._background:
                return
            self._background = True

        def run():
            try:
                with self._lock:
                    entry = self._entry
                    if entry is None or entry[0] != key or self.clock() - entry[1] >= self.refresh:
                        self._compute(key, compute)
            except Exception as exc:  # the next caller dumps in the foreground and sees the error
                log.debug("background status refresh failed: %s", exc)
            finally:
                self._background = False

        threading.Thread(target=run, name="status-refresh", daemon=True).start()
