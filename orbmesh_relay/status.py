"""The relay's JSON status, for the app that runs it (--status-file PATH, or
Relay.status() when embedded).  Its fields are documented in docs/api.md
("The relay's status").

The file is written whole to a temporary name beside it and renamed over
it, so a reader never sees half of one; a rename that fails (Windows, while
a reader holds the file open) is tried again at the next write.  The relay's
monitor and a switch both write it: one at a time, each taking its snapshot
inside the turn, so an older snapshot never lands after a newer one (a
switch's count once lost to the monitor's write begun just before it).
"""
import json
import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def status_dict(relay, now):
    current = relay.control.current
    with relay._lock:
        switches = list(relay.switches)
        count = relay.switch_count
    status = {
        "mode": relay.mode,
        "transport": current.name if current is not None else None,
        "state": relay.control.state,
        "connected": relay.stats.connected,
        "rtt_ms": round(current.rtt * 1000, 2) if current is not None and current.rtt is not None else None,
        "switch_count": count,
        "switches": switches,
        "started_at": round(relay.started_at, 3),
        "updated_at": round(time.time(), 3),
    }
    status.update(relay.stats.snapshot())
    status.update(relay.control.details(now))
    if relay.fatal:
        status["fatal"] = relay.fatal
    return status


class StatusFile:
    def __init__(self, path):
        self.path = str(path)
        self.temporary = "%s.%d.tmp" % (self.path, os.getpid())
        self._warned = False
        self._turn = threading.Lock()

    def write(self, snapshot):
        """Write snapshot(), taken once this write's turn has come."""
        with self._turn:
            self._write(snapshot())

    def _write(self, status):
        try:
            with open(self.temporary, "w") as handle:
                json.dump(status, handle, indent=1)
                handle.write("\n")
            os.replace(self.temporary, self.path)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot write the status file %s: %s", self.path, exc)
