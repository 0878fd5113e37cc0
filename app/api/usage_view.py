"""Blueprint: GET /wireguard/usage and POST /wireguard/limits (API key), and the usage gauges of /metrics.

The accounting and the decisions are app/peers/usage.py's; this is the edge.
"""
import time

from flask import Blueprint, current_app
from prometheus_client.core import GaugeMetricFamily

from ..helper import get_helper
from ..ops import metrics
from ..peers import store, usage
from ..peers.db import get_db
from .auth import api_key_required
from .errors import ApiError
from .schemas import LimitsSchema, UsageQuerySchema, load_body, load_query

bp = Blueprint("usage", __name__, url_prefix="/wireguard")

limits_schema = LimitsSchema()
usage_query_schema = UsageQuerySchema()


@bp.get("/usage")
@api_key_required
def usage_report():
    """A user's usage in the period, per device and in total (userUuid), or a page of every user's."""
    query = load_query(usage_query_schema)
    if "userUuid" in query:
        return dict({"success": True}, **usage.user_usage(get_db(), query["userUuid"]))
    try:
        users, cursor = usage.page(get_db(), query.get("cursor"), query.get("limit", usage.PAGE))
    except ValueError:
        raise ApiError("VALIDATION_ERROR", "Request validation failed",
                       {"fields": {"cursor": ["Not a cursor this server gave out."]}}) from None
    return {"success": True, "users": users, "nextCursor": cursor}


@bp.post("/limits")
@metrics.counted(metrics.LIMITS)
@api_key_required
def limits():
    """Set or clear a user's speed tier and data quota on this node, or start a new period; answers the usage."""
    data = load_body(limits_schema)
    result = usage.set_limits(get_db(), get_helper(), current_app.config, data)
    return dict({"success": True}, **result)


class UsageGauges:
    """Users at their quota or with a tier or quota, and peers that never completed a handshake: read from
    SQLite when scraped (no per-user label)."""

    # A client handshakes within seconds of its connect; a peer still without one after this long (since it
    # was added or changed) is counted as failing to (UDP blocked, wrong key, wrong endpoint).
    HANDSHAKE_GRACE = 180

    def __init__(self, db):
        self.db = db

    def collect(self):
        try:
            at_quota, tiered, with_quota = self.db.execute(
                "SELECT count(cut_at), count(rate_mbps), count(quota_bytes) FROM usage_users").fetchone()
            silent = self.db.execute(
                "SELECT count(*) FROM peers p LEFT JOIN usage_devices d ON d.user_id = p.user_id AND "
                "d.source = p.source AND d.device = coalesce(p.device_id, p.public_key) WHERE p.public_key IN "
                "(SELECT public_key FROM peers WHERE %s) AND p.updated_at < ? AND coalesce(d.handshake_at, 0) < "
                "p.updated_at" % store.ON_INTERFACE, (time.time() - self.HANDSHAKE_GRACE,)).fetchone()[0]
        except Exception:  # the database's state is /metrics' other gauges' business; these are left out
            return
        yield GaugeMetricFamily("orbmesh_users_at_quota", "Users whose usage reached their quota (peers off the "
                                "interface)", value=at_quota)
        yield GaugeMetricFamily("orbmesh_users_with_tier", "Users with a speed tier in effect", value=tiered)
        yield GaugeMetricFamily("orbmesh_users_with_quota", "Users with a data quota in effect", value=with_quota)
        yield GaugeMetricFamily("orbmesh_peers_without_handshake", "Peers on the interface with no handshake "
                                "since %d s after they were added or changed" % self.HANDSHAKE_GRACE, value=silent)
