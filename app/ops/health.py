"""Blueprint: GET /health: the status for anyone, the details with an internal API key.

healthy: database and helper answer, the interface is up and the node's
DNS resolver (when ORBMESH_DNS_RESOLVER is on) answers on the gateway.
degraded: both answer but the interface is down or holds a different
number of peers than the database (a reconcile is pending), or the
resolver does not answer (clients are sent to it first).
unhealthy: the database or the helper does not answer; HTTP 503 so a
load balancer stops sending clients here.

Without a valid X-API-Key the answer is ``success`` and ``status`` (and the
error of an unhealthy one) only: peer count, traffic and the interface are
nobody else's business.  Details are added to the body when the key is
valid, each as its own block.
"""
import logging

from flask import Blueprint, current_app

from ..api.auth import has_api_key
from ..api.errors import envelope
from ..dns import resolver
from ..helper import Addressing, HelperFailed, HelperUnavailable, get_helper
from ..peers import store
from ..peers.db import get_db

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


def _database():
    try:
        return {"ok": True}, store.count_live(get_db())  # quarantined and quota-held peers are off on purpose
    except Exception as exc:  # any database failure is reported, not raised
        log.warning("health: database check failed: %s", exc.__class__.__name__)
        return {"ok": False, "error": "database unavailable"}, None


def _wireguard(config):
    block = {"interface": config["INTERFACE"], "running": False, "port": None, "publicKey": None,
             "peerCount": None, "mtu": None, "rxBytes": None, "txBytes": None, "backend": None, "gateway6": None,
             "ipv6": None}
    try:
        live = get_helper().status()
    except (HelperUnavailable, HelperFailed) as exc:
        return block, {"ok": False, "error": exc.message}
    addressing = Addressing(live)  # ipv6: what clients get, forward, local or off (wghelper/ipv6.py)
    block.update(interface=live.get("interface"), running=bool(live.get("running")),
                 port=live.get("listen_port"), publicKey=live.get("public_key"),
                 peerCount=live.get("peer_count"), mtu=live.get("mtu"), rxBytes=live.get("rx_bytes"),
                 txBytes=live.get("tx_bytes"), backend=live.get("backend"), gateway6=addressing.gateway6,
                 ipv6=addressing.mode)
    return block, {"ok": True}


@bp.get("/health")
def health():
    """Report the status of the database, the helper, the interface and the DNS resolver (the details with a key)."""
    database, rows = _database()
    wireguard, helper = _wireguard(current_app.config)
    dns = resolver.health()
    if not (database["ok"] and helper["ok"]):
        status = "unhealthy"
    elif not wireguard["running"] or wireguard["peerCount"] != rows or dns.get("ok") is False:
        status = "degraded"
    else:
        status = "healthy"
    body = {"success": status != "unhealthy", "status": status}
    if has_api_key():
        body.update(wireguard=wireguard, database=database, helper=helper, resolver=dns)
    if status == "unhealthy":
        failed = "HELPER_UNAVAILABLE" if not helper["ok"] else "INTERNAL_ERROR"
        body["error"] = envelope(failed, "Service is unhealthy")["error"]
        return body, 503
    return body
