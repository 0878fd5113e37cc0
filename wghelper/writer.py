"""One thread makes every change the helper's commands ask for, merging queued requests.

Each ``wg set`` is a fork+exec and, with wireguard-go, a full UAPI
round-trip; a burst of 500 device registrations becomes one or a few calls
instead of 500.  The ``limits`` requests that wait in the same round become
one nft run (Firewall.set_limits).  Requests block until their own job is
done, and a merged call that fails is retried job by job so each request
gets its own answer.
"""
import collections
import logging
import threading
import time

from . import protocol
from .errors import CommandFailed, HelperError

log = logging.getLogger(__name__)

SLICE = 1000  # changes of a planned job per `wg set` before the plain jobs waiting get their turn
REMEMBER = 600  # seconds a plain job's change is remembered against a sync read before it (changed_since)


def stopped():
    return HelperError(protocol.INTERFACE_DOWN, "the helper is stopping")


class Job:
    def __init__(self, removes=(), adds=(), plan=None):
        self.removes, self.adds = list(removes), list(adds)
        self.plan = plan  # callable run on the writer thread -> (removes, adds, result)
        self.done = threading.Event()
        self.result = self.error = None

    def finish(self, result=None, error=None):
        self.result, self.error = result, error
        self.done.set()

    def counts(self):
        return {"removed": len(self.removes), "applied": len(self.adds)}


class LimitsJob(Job):
    """A ``limits`` request: the users' plans, for Firewall.set_limits; no peer changes."""

    def __init__(self, users, replace):
        super().__init__()
        self.users, self.replace = users, replace


def merge(jobs):
    """Merge jobs into (removes, adds), the last operation on a key winning."""
    ops = {}
    for job in jobs:
        for key, op in [(k, None) for k in job.removes] + [(p["public_key"], p) for p in job.adds]:
            ops.pop(key, None)
            ops[key] = op
    return [k for k, op in ops.items() if op is None], [op for op in ops.values() if op is not None]


class Writer:
    def __init__(self, cmd, ifname, firewall=None):
        self.cmd = cmd
        self.ifname = ifname
        self.firewall = firewall  # wghelper/firewall.py Firewall, for limits; None in tests that need none
        self.wg_set_calls = 0
        self.version = 0  # bumped after every wg set has finished, failed or not (statuscache.py)
        self.jobs_applied = 0
        # The keys on the interface, when known: read from a dump that no wg set overlapped (learn) and
        # kept by every wg set since; None after a failed one (what it did is unknown).  The status
        # command counts peers from it instead of dumping 60,000 of them after every change.
        self._keys, self._keys_generation = None, None
        # len(_keys) as of the last wg set that finished: a status asked while one runs gets the count
        # before it (its changes are not done: no request of them has its answer yet).  When the count
        # went away for the whole wg set, nearly every status under steady connects found none and dumped.
        self._count = None
        self._keys_lock = threading.Lock()
        self._setting = False  # a wg set is running
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = None
        # key -> when a plain job last changed it (monotonic), on the writer thread only: a sync of rows
        # the app read before that leaves the key alone (changed_since).  Pruned past REMEMBER seconds.
        self._changed, self._prune_at = {}, 4096

    def changed_since(self, since):
        """{key: added?} of the keys a plain job changed at or after `since` (the host's monotonic clock;
        None: none), each by its last change.
        A connect that commits after a reconcile read its rows reaches the interface before the sync
        does: without this the sync took it off until its repair, and the client's handshake was lost."""
        if since is None:
            return {}
        return {key: added for key, (at, added) in self._changed.items() if at >= since}

    def _remember(self, removes, adds):
        """Record merge()'s result: each key's last change is what the interface is to show."""
        now = time.monotonic()
        for key, added in [(k, False) for k in removes] + [(p["public_key"], True) for p in adds]:
            self._changed[key] = (now, added)
        if len(self._changed) > self._prune_at:
            self._changed = {k: v for k, v in self._changed.items() if v[0] >= now - REMEMBER}
            self._prune_at = max(4096, 2 * len(self._changed))

    def start(self):
        # A thread of its own because what it runs blocks: `wg set` (fork, exec, wait) and nft's commit.
        self._thread = threading.Thread(target=self._loop, name="wg-writer", daemon=True)
        self._thread.start()

    def stop(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            pending, self._queue = list(self._queue), collections.deque()
        for job in pending:
            job.finish(error=stopped())

    def pending(self):
        with self._cond:
            return len(self._queue)

    def apply(self, removes=(), adds=()):
        """Remove then add/update peers; returns {"removed": n, "applied": m}."""
        return self._submit(Job(removes, adds))

    def run_planned(self, plan):
        """Run plan() on the writer thread, then apply what it returns.

        Used by sync: reading the current peers and applying the difference
        happen with no other change in between.
        """
        return self._submit(Job(plan=plan))

    def set_limits(self, users, replace=False):
        """Firewall.set_limits for one ``limits`` request, merged with those waiting beside it."""
        if self.firewall is None:
            raise HelperError(protocol.INTERFACE_DOWN, "limits are not available in this helper")
        return self._submit(LimitsJob(users, replace))

    def _submit(self, job):
        with self._cond:
            if self._stopping or self._thread is None:
                raise stopped()
            self._queue.append(job)
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self):
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch, self._queue = list(self._queue), collections.deque()
            # In order: each planned job alone, the plain jobs between them merged.
            while batch:
                if batch[0].plan:
                    with self._cond:  # what follows it waits in the queue, where _run_planned finds it
                        self._queue.extendleft(reversed(batch[1:]))
                    self._run_planned(batch[0])
                    break
                size = next((i for i, job in enumerate(batch) if job.plan), len(batch))
                self._run_round(batch[:size])
                batch = batch[size:]

    def _plain_waiting(self):
        """The plain jobs at the head of the queue, taken out of it."""
        with self._cond:
            jobs = []
            while self._queue and not self._queue[0].plan:
                jobs.append(self._queue.popleft())
            return jobs

    def _run_planned(self, job):
        """A planned job (a sync) a SLICE of changes at a time, the plain jobs that arrive in between run
        between the slices: at 60,000 peers a sync is 60 `wg set` calls and about 16 s on wireguard-go,
        and a connect waited for all of them.  A key a plain job changed is dropped from the slices still
        to come (the later change wins, as in merge())."""
        try:
            removes, adds, result = job.plan()
            ops = [(key, None) for key in removes] + [(p["public_key"], p) for p in adds]
            while ops:
                part, ops = ops[:SLICE], ops[SLICE:]
                self._apply([k for k, op in part if op is None], [op for _, op in part if op is not None])
                waiting = self._plain_waiting() if ops else []
                if waiting:
                    self._run_round(waiting)
                    touched = {k for w in waiting for k in list(w.removes) + [p["public_key"] for p in w.adds]}
                    ops = [(k, op) for k, op in ops if k not in touched]
        except Exception as exc:
            job.finish(error=exc)
            return
        self.jobs_applied += 1
        job.finish(result=result)

    def _run_round(self, jobs):
        """Plain jobs that waited together: their peer changes as one `wg set`, their limits as one nft run."""
        peers = [job for job in jobs if not isinstance(job, LimitsJob)]
        if peers:
            self._run_group(peers)
        limits = [job for job in jobs if isinstance(job, LimitsJob)]
        if limits:
            self._run_limits(limits)

    def _run_limits(self, jobs):
        try:
            result = self.firewall.set_limits([(job.users, job.replace) for job in jobs])
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].finish(error=exc)
                return
            for job in jobs:  # one by one, so that only the bad request fails
                try:
                    job.finish(result=self.firewall.set_limits([(job.users, job.replace)]))
                except Exception as single:
                    job.finish(error=single)
            return
        for job in jobs:
            job.finish(result=result)

    def _run_group(self, jobs):
        removes, adds = merge(jobs)
        self._remember(removes, adds)  # before the wg set: a change that failed part-way may still be on it
        if len(jobs) == 1:
            return self._run(jobs[0])
        try:
            self._apply(removes, adds)
        except CommandFailed as exc:
            log.warning("merged wg set for %d jobs failed (%s); retrying them one by one", len(jobs), exc.stderr)
            for job in jobs:
                self._run(job)
            return
        except Exception as exc:  # finish every waiter, whatever happened
            log.exception("writer failed")
            for job in jobs:
                job.finish(error=exc)
            return
        for job in jobs:
            self.jobs_applied += 1
            job.finish(result=job.counts())

    def _run(self, job):
        try:
            removes, adds, result = job.plan() if job.plan else (job.removes, job.adds, job.counts())
            self._apply(removes, adds)
        except Exception as exc:
            job.finish(error=exc)
            return
        self.jobs_applied += 1
        job.finish(result=result)

    def learn(self, keys, generation, version):
        """A dump of the interface of `generation` that started when `version` was current found `keys`:
        kept unless a wg set ran during it (one finished: the version moved; or one is running)."""
        with self._keys_lock:
            if self.version == version and not self._setting:
                self._keys, self._keys_generation = set(keys), generation
                self._count = len(self._keys)

    def peer_count(self, generation):
        """How many peers the interface of `generation` holds, or None when unknown."""
        count = self._count
        return count if count is not None and self._keys_generation == generation else None

    def _apply(self, removes, adds):
        if removes or adds:
            self.wg_set_calls += 1
            with self._keys_lock:
                keys, self._keys, self._setting = self._keys, None, True
            try:
                self.cmd.set_peers(self.ifname, removes, adds)
                if keys is not None:
                    keys.difference_update(removes)
                    keys.update(p["public_key"] for p in adds)
            except BaseException:
                keys = None
                raise
            finally:
                with self._keys_lock:
                    self._keys, self._setting = keys, False
                    self._count = None if keys is None else len(keys)
                    self.version += 1
