"""What every benchmark shares: arguments, namespaces, the stack, statistics, output.

Benchmarks follow the tests' network rules: everything lives in namespaces
with unique names (tests/e2e/netns.py), deleted even on failure, and only
processes we started are stopped, by pid.  The building blocks are the
end-to-end tests' own (Stack, Netns, veth, WgClient).
"""
import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import _remove_dead_sockets, _wireguard_sockets, wireguard_go_in  # noqa: E402
from tests.e2e.netns import Netns, veth  # noqa: E402
from tests.e2e.stack import CLIENT_ADDR, SERVER_ADDR, Stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GATEWAY = "10.8.0.1"


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one short run: checks the benchmark works")
    p.add_argument("--runs", type=int, default=None, help="runs per measurement (median is reported)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON result")
    return p


def random_key():
    """A WireGuard public key: base64 of 32 bytes (wg accepts any 32 bytes as a peer key)."""
    return base64.b64encode(os.urandom(32)).decode()


# --- statistics -------------------------------------------------------------

def percentile(samples, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def latency_summary(seconds):
    """p50/p99/max in milliseconds of a list of durations in seconds."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(seconds), "p50_ms": round(percentile(seconds, 50) * 1000, 2),
            "p99_ms": round(percentile(seconds, 99) * 1000, 2), "max_ms": round(max(seconds) * 1000, 2)}


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def ratio(a, b, digits=2):
    if a is None or not b:
        return None
    return round(a / b, digits)


# --- output -----------------------------------------------------------------

def table(headers, rows):
    """A Markdown table (pastes straight into the README)."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine():
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def write_result(out_dir, name, result, text):
    """Print the table and write <out>/<name>.json beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(result, machine=machine(), table=text)
    path = out_dir / ("%s.json" % name)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print("\nwritten %s" % path)
    return path


def chart(out_dir, name, draw):
    """Write <out>/<name>.png: draw(figure) fills a matplotlib figure (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure = pyplot.figure(figsize=(9, 4.8), dpi=100)
    draw(figure)
    figure.tight_layout()
    path = Path(out_dir) / ("%s.png" % name)
    figure.savefig(path)
    pyplot.close(figure)
    print("written %s" % path)
    return path


# --- CPU from /proc ---------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid, children=True):
    """User + system CPU of a process (plus its reaped children's, if asked), 0 if it is gone."""
    try:
        fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / TICKS


def targets_text(checks):
    """Lines 'target: met/MISSED (value)' for (name, ok, value) triples; smoke runs skip this."""
    return "\n".join("- %s: %s (%s)" % (name, "met" if ok else ("MISSED" if ok is False else "n/a"), value)
                     for name, ok, value in checks)


# --- namespaces and the stack -------------------------------------------------

def _terminated(signum, frame):
    raise SystemExit(128 + signum)


class Lab:
    """Namespaces and scratch space for one benchmark, all removed on exit."""

    def __init__(self):
        self.namespaces = []
        self.tmp = None
        self._sockets_before = set()
        self._cleanups = []

    def __enter__(self):
        # SIGTERM (say, from `timeout`) unwinds through __exit__, so the namespaces still go.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminated)
        self.tmp = Path(tempfile.mkdtemp(prefix="orbmesh-bench-"))
        self._sockets_before = _wireguard_sockets()
        return self

    def netns(self, tag):
        ns = Netns(tag)
        self.namespaces.append(ns)
        ns.create()
        return ns

    def on_exit(self, func, *args):
        """Run func(*args) before the namespaces go (last registered, first run)."""
        self._cleanups.append((func, args))

    def stack(self, workers=2, env=None, tag=""):
        """Server and client namespaces joined by a veth, and an (unstarted) Stack."""
        server, client = self.netns("bsrv" + tag), self.netns("bcli" + tag)
        veth(server, SERVER_ADDR + "/24", client, CLIENT_ADDR + "/24")
        tmp = self.tmp / ("stack" + tag)
        tmp.mkdir()
        stack = Stack(server, client, tmp, workers=workers)
        stack.env.update(env or {})
        return stack

    def __exit__(self, *exc):
        errors = []
        for func, args in reversed(self._cleanups):
            try:
                func(*args)
            except Exception as err:  # keep cleaning
                errors.append(err)
        inodes = {ns.inode for ns in self.namespaces if ns.inode is not None}
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except Exception as err:
                errors.append(err)
        _remove_dead_sockets(_wireguard_sockets() - self._sockets_before)
        leaked = wireguard_go_in(inodes)
        if exc[0] is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:  # keep the logs (helper.log, app.log) of a failed run
            print("benchmark failed; logs kept in %s" % self.tmp, file=sys.stderr)
        if leaked:
            print("warning: wireguard-go left running in our namespaces: %s" % leaked, file=sys.stderr)
        if errors and exc[0] is None:
            raise errors[0]
        return False


def seed_peers(stack, total, batch=5000):
    """Bring the stack to `total` client peers through the app's own store, then one helper sync.

    Rows go in exactly as connect would write them (Allocator, store.insert);
    reconcile() then puts them on the interface, so database and interface
    agree before anything is measured.  Returns the seconds the sync took.
    """
    import time

    from app.helper import HelperClient
    from app.peers import reconcile, store
    from app.peers.allocator import Allocator
    from app.peers.db import connect, write

    config = stack.env
    db = connect(config["ORBMESH_DB_PATH"])
    try:
        allocator = Allocator(config["ORBMESH_POOL"], GATEWAY)
        have = store.count(db)
        while have < total:
            with write(db):
                for i in range(have, min(total, have + batch)):
                    store.insert(db, {"public_key": random_key(), "addr": allocator.allocate(db),
                                      "user_id": "seed-%d" % i, "device_id": "seed", "source": "client",
                                      "endpoint": None, "keepalive": 0})
            have = store.count(db)
        helper = HelperClient(config["ORBMESH_HELPER_SOCKET"], 120)
        started = time.monotonic()
        reconcile.reconcile(db, helper)
        return time.monotonic() - started
    finally:
        db.close()
