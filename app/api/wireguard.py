"""Blueprint: /wireguard/connect, disconnect, status, add-peer, remove-peer."""
import ipaddress
import logging
import time

from flask import Blueprint, current_app, g, jsonify

from ..bridge.bridges import get_bridges
from ..dns import resolver
from ..helper import Addressing, get_helper
from ..ops import metrics
from ..ops.logs import client_address
from ..peers import lifecycle, usage
from ..peers.db import get_db
from . import ratelimit
from .auth import api_key_required, check_scope, device_token_required, peer_key_required
from .errors import ApiError
from .schemas import AddPeerSchema, ConnectSchema, EmptySchema, RemovePeerSchema, load_body

bp = Blueprint("wireguard", __name__, url_prefix="/wireguard")
log = logging.getLogger(__name__)
# Seconds a peer that disconnected through its own tunnel stays after its answer is written.
THROUGH_TUNNEL_GRACE = 0.5

connect_schema = ConnectSchema()
empty_schema = EmptySchema()
add_peer_schema = AddPeerSchema()
remove_peer_schema = RemovePeerSchema()


def _allocator():
    return current_app.extensions["orbmesh_allocator"]


def server_endpoint(config):
    host = config["PUBLIC_HOST"]
    try:
        if ipaddress.ip_address(host).version == 6:
            host = "[%s]" % host
    except ValueError:
        pass  # a DNS name goes out as it is
    return "%s:%d" % (host, config["PUBLIC_PORT"])


def client_ipv6(helper, peer):
    """(ip6, gateway6) for the connect answer; (None, None) while IPv6 is off or for a bridged session."""
    addressing = helper.addressing()
    ip6 = addressing.of(peer)
    return ip6, addressing.gateway6 if ip6 else None


@bp.post("/connect")
@metrics.counted(metrics.CONNECTS)
@device_token_required
@ratelimit.limited("connect")
def connect():
    """Register the device's key on the interface and hand back its tunnel config."""
    data = load_body(connect_schema)
    config = current_app.config
    helper = get_helper()
    peer = lifecycle.connect_device(get_db(), helper, _allocator(), get_bridges(), *g.device, data["publicKey"],
                                exit_id=data.get("exitServerId"), force_direct=data["force_direct"],
                                max_devices=config["MAX_DEVICES_PER_USER"], plan=usage.device_plan())
    ip6, gateway6 = client_ipv6(helper, peer)
    return {"success": True, "publicKey": peer.public_key, "serverPublicKey": helper.server_key(),
            "ip": peer.address + "/32", "gateway": config["GATEWAY"],
            "serverEndpoint": server_endpoint(config), "dns": resolver.client_dns(config, gateway6),
            "allowedIPs": config["CLIENT_ALLOWED_IPS"], "mtu": config["MTU"],
            "keepalive": config["KEEPALIVE"], "mode": peer.mode, "exitServerId": peer.exit_id,
            "ip6": ip6, "gateway6": gateway6}


@bp.post("/disconnect")
@metrics.counted(metrics.DISCONNECTS)
@device_token_required
def disconnect():
    """Remove the device's peer and free its address; a second call is a no-op."""
    load_body(empty_schema)
    answer = {"success": True, "message": "Disconnected successfully"}
    peer = lifecycle.forget_asked_through_own_tunnel(get_db(), get_helper(), *g.device, client_address())
    if peer is None:
        lifecycle.disconnect_device(get_db(), get_helper(), *g.device)
        return answer
    # Asked through the tunnel being removed: the answer first, then the peer (after the response is
    # written, outside the request: a context of its own).
    app = current_app._get_current_object()

    def remove():
        # The answer is written to nginx, not yet through the tunnel: a moment for it (and its
        # retransmissions) to leave by the peer before the peer goes.  time.sleep yields under gevent.
        time.sleep(THROUGH_TUNNEL_GRACE)
        with app.app_context():
            try:
                lifecycle.remove_forgotten(get_db(), get_helper(), peer)
            except Exception:  # nobody to answer; reconcile takes a peer with no row off
                log.exception("removing the peer of a device that disconnected through its tunnel failed")

    response = jsonify(answer)
    response.call_on_close(remove)
    return response


@bp.get("/status")
@api_key_required
def status():
    """Public key and peer count, read from the live interface; the IPv6 gateway (null: peers get no IPv6)."""
    live = get_helper().status()
    return {"success": True, "publicKey": live["public_key"], "peerCount": live["peer_count"],
            "gateway6": Addressing(live).gateway6}


@bp.post("/add-peer")
@metrics.counted(metrics.ADD_PEERS)
@peer_key_required
def add_peer():
    """Add a peer provisioned by OrbNET at the address OrbNET chose."""
    data = load_body(add_peer_schema)
    check_scope(data["userUuid"])
    lifecycle.add_orbnet_peer(get_db(), get_helper(), current_app.config, data, only_peer=g.key_scope is not None)
    return {"success": True, "message": "Peer added successfully"}


@bp.post("/remove-peer")
@metrics.counted(metrics.REMOVE_PEERS)
@peer_key_required
def remove_peer():
    """Remove every peer of the user, or only the one with `publicKey`."""
    data = load_body(remove_peer_schema)
    check_scope(data["userUuid"])
    removed = lifecycle.remove_user_peers(get_db(), get_helper(), data["userUuid"], data.get("publicKey"))
    if not removed:
        raise ApiError("NOT_FOUND", "No peers found for this user" + (" with this key" if "publicKey" in data else ""))
    return {"success": True, "message": "Peer removed successfully", "removed": removed}
