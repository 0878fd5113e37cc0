"""GET /metrics (internal API key): every worker's instruments, and gauges read at scrape time.

The instruments are defined in metrics.py.  Peers and pool gauges are not
kept anywhere: they are read from SQLite at scrape time, so every worker
reports the same numbers.
"""
import logging
import sqlite3

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from ..helper import HelperFailed, HelperUnavailable, get_helper
from ..ops.metrics import MULTIPROCESS, REGISTRY
from ..peers import store
from ..peers.db import get_db
from .auth import api_key_required
from .usage_view import UsageGauges

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)


class StateCollector:
    """Gauges read from the database and the allocator when scraped."""

    def __init__(self, db, allocator):
        self.db = db
        self.allocator = allocator

    def collect(self):
        yield GaugeMetricFamily("orbmesh_pool_addresses", "Client addresses in the pool (without network, "
                                "gateway and broadcast)", value=self.allocator.size)
        try:
            counts = store.count_live_by_source(self.db)
            quarantined = store.count_quarantined(self.db)
            free = self.allocator.free(self.db)
        except sqlite3.Error as exc:
            log.warning("metrics: database unavailable: %s", exc.__class__.__name__)
            return
        peers = GaugeMetricFamily("orbmesh_peers", "Peers in the database (and so on the interface) by source",
                                  labels=["source"])
        for source in ("client", "orbnet"):
            peers.add_metric([source], counts.get(source, 0))
        yield peers
        yield GaugeMetricFamily("orbmesh_pool_free_addresses", "Client addresses not allocated", value=free)
        yield GaugeMetricFamily("orbmesh_quarantined_peers", "Stale client peers off the interface that still "
                                "hold their address", value=quarantined)


class HelperGauges:
    """Whether the helper answers and its interface is up, asked when scraped (hello runs no command)."""

    def __init__(self, helper):
        self.helper = helper

    def collect(self):
        try:
            running = bool(self.helper.hello().get("running"))
            up = 1
        except (HelperUnavailable, HelperFailed):
            up, running = 0, False
        yield GaugeMetricFamily("orbmesh_helper_up", "1 when the root helper answered this scrape", value=up)
        yield GaugeMetricFamily("orbmesh_interface_up", "1 when the helper reports its WireGuard interface up",
                                value=int(running))


class _Local:
    """This process's metrics, for single-process mode."""

    def collect(self):
        return REGISTRY.collect()


def exposition(*collectors):
    """The text exposition of every worker's metrics plus `collectors`."""
    registry = CollectorRegistry()
    if MULTIPROCESS:
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Local())
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)


@bp.get("/metrics")
@api_key_required
def metrics():
    """Prometheus text exposition, summed over the workers."""
    state = StateCollector(get_db(), current_app.extensions["orbmesh_allocator"])
    return Response(exposition(state, UsageGauges(get_db()), HelperGauges(get_helper())),
                    content_type=CONTENT_TYPE_PLAIN_0_0_4,
                    headers={"Cache-Control": "no-store"})
