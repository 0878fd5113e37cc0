"""The reconcile watcher's periodic rounds on the real stack: the drift check and the sweep read the
interface with one `wg show IF dump` a round, not one each (app/peers/reconcile.py Watcher.round).

On wireguard-go each dump holds every change of the interface until it is read out (1-1.5 s at
60,000 peers).  A `wg` first on the helper's PATH notes each dump and runs the real one.
"""
import os
import shutil
import sqlite3
import time

import pytest

pytestmark = pytest.mark.e2e

INTERVAL = 4.0  # the drift check's and the sweep's, so that a window of 16 s holds four rounds


@pytest.fixture
def dumps(tmp_path_factory):
    """The file the logging `wg` writes one line (the time) to per `wg show IF dump`."""
    bin_dir = tmp_path_factory.mktemp("wg-bin")
    log = bin_dir / "dumps.log"
    log.write_text("")
    wrapper = bin_dir / "wg"
    wrapper.write_text('#!/bin/sh\n[ "$1 $3" = "show dump" ] && date +%%s.%%N >> %s\nexec %s "$@"\n'
                       % (log, shutil.which("wg")))
    wrapper.chmod(0o755)
    return log


@pytest.fixture
def stack_env(dumps):
    return {"PATH": "%s:%s" % (dumps.parent, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")),
            "ORBMESH_RECONCILE_INTERVAL": str(INTERVAL), "ORBMESH_SWEEP_INTERVAL": str(INTERVAL),
            # Nothing else dumps in the window: no quarantine, and one usage count, at start.
            "ORBMESH_STALE_AFTER": "3600", "ORBMESH_USAGE_INTERVAL": "3600"}


def leases(stack):
    db = sqlite3.connect(stack.env["ORBMESH_DB_PATH"])
    try:
        return dict(db.execute("SELECT key, value FROM meta WHERE key IN ('reconciled_at', 'swept_at')"))
    finally:
        db.close()


def test_the_drift_check_and_the_sweep_read_the_interface_once_a_round(stack, dumps):
    deadline = time.monotonic() + 30
    while len(leases(stack)) < 2:  # both have run once (at start, in some worker's first round)
        assert time.monotonic() < deadline, "no drift check and sweep at start"
        time.sleep(0.2)
    time.sleep(INTERVAL + 1)  # start-up's syncs and first count are over
    began = time.time()
    drift_checks, sweeps = set(), set()
    while time.time() < began + 4 * INTERVAL:
        now = leases(stack)
        drift_checks.add(now["reconciled_at"])
        sweeps.add(now["swept_at"])
        time.sleep(0.1)
    ended = time.time()
    drift_checks = {float(v) for v in drift_checks if began <= float(v) <= ended}
    sweeps = {float(v) for v in sweeps if began <= float(v) <= ended}
    made = [float(line) for line in dumps.read_text().split()]
    in_window = [t for t in made if began <= t <= ended]
    assert len(drift_checks) >= 3 and len(sweeps) >= len(drift_checks) - 1, (drift_checks, sweeps)
    # One dump a round (the last round's may fall past the window; one sweep on a loaded machine may come
    # more than REFRESH after its check's dump and make its own: two a round would be 8 here) ...
    assert len(drift_checks) - 1 <= len(in_window) <= len(drift_checks) + 1, (in_window, drift_checks, sweeps)
    # ... because each sweep ran in the round of a drift check, a moment after it, and counted from its dump.
    assert all(any(0 <= s - d < 2 for d in drift_checks) for s in sweeps), (drift_checks, sweeps)
