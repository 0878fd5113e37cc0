"""What the app may ask of the helper: every command and the checks on its arguments.

The helper runs nothing it has not parsed here first: unknown commands and
unknown arguments are refused, and every value is validated and normalised
(wghelper/validate.py) before wghelper/handlers.py acts on it.  ``s`` is the
helper's Settings: the pools and gateways bound every client address;
``own`` holds the helper's public keys (server, bridge), which no peer may use.

Standard library only: this is the contract both processes read.
"""
from . import validate
from .errors import Invalid
from .protocol import MAX_BRIDGE_SLOTS


def _pools(s):
    """Where peers' addresses may lie: /32s in the pool, /128s in POOL6 only while clients get IPv6
    (ipv6 mode "forward", wghelper/ipv6.py): a /128 from an app that has not yet seen a helper start in
    mode "local" is refused rather than left to black-hole its client's IPv6."""
    return [(s.pool, s.gateway), s.clients6]


def no_args(args, s, own=()):
    validate.obj(args, "", ())
    return {}


def apply_peers(args, s, own=()):
    """{"remove": [key], "add": [peer]}: removals first, then adds and updates."""
    validate.obj(args, "", ("remove", "add"))
    remove = validate.key_list(args.get("remove", []), "remove")
    add = validate.peers(args.get("add", []), _pools(s), "add", own)
    if not remove and not add:
        raise Invalid("remove", "remove and add cannot both be empty")
    removing = set(remove)
    for index, peer in enumerate(add):
        if peer["public_key"] in removing:
            raise Invalid("add[%d].public_key" % index, "is also in remove")
    return {"remove": remove, "add": add}


def sync_peers(args, s, own=()):
    """{"peers": [peer], "since"?: seconds}: the complete set the interface must hold, as the app read it
    at `since` (the host's monotonic clock); what an apply_peers changed after that stays."""
    validate.obj(args, "", ("peers", "since"), ("peers",))
    since = args.get("since")
    return {"peers": validate.peers(args["peers"], _pools(s), own=own),
            "since": None if since is None else validate.seconds_mark(since, "since")}


def bridge_up(args, s, own=()):
    """{"slot", "public_key", "endpoint", "address", "keepalive"?}: the tunnel to one exit."""
    validate.obj(args, "", ("slot", "public_key", "endpoint", "address", "keepalive"),
          ("slot", "public_key", "endpoint", "address"))
    endpoint = validate.endpoint(args["endpoint"])
    if endpoint is None:
        raise Invalid("endpoint", "is required")
    return {"slot": validate.integer(args["slot"], 0, MAX_BRIDGE_SLOTS - 1, "slot"),
            "public_key": validate.public_key(args["public_key"], own=own), "endpoint": endpoint,
            "address": validate.tunnel_address(args["address"], s.bridge_networks),
            "keepalive": validate.keepalive(args.get("keepalive", 25))}


def bridge_down(args, s, own=()):
    validate.obj(args, "", ("slot",), ("slot",))
    return {"slot": validate.integer(args["slot"], 0, MAX_BRIDGE_SLOTS - 1, "slot")}


def bridge_rules(args, s, own=()):
    """{"add": [{"address", "slot"}], "remove": [address], "exclusive": bool}."""
    validate.obj(args, "", ("add", "remove", "exclusive"))
    add = {}
    for item, rule in validate.items(args.get("add", []), "add", validate.MAX_PEERS, "rules"):
        validate.obj(rule, item + ".", ("address", "slot"), ("address", "slot"))
        address = validate.client_address(rule["address"], s.pool, s.gateway, item + ".address")
        if address in add:
            raise Invalid(item + ".address", "is listed twice")
        add[address] = validate.integer(rule["slot"], 0, MAX_BRIDGE_SLOTS - 1, item + ".slot")
    remove = validate.unique([(f, validate.client_address(v, s.pool, s.gateway, f))
                              for f, v in validate.items(args.get("remove", []), "remove", validate.MAX_PEERS,
                                                         "addresses")])
    if set(add) & set(remove):
        raise Invalid("remove", "an address is also in add")
    return {"add": add, "remove": remove, "exclusive": validate.boolean(args.get("exclusive", False), "exclusive")}


def limits(args, s, own=()):
    """{"users": [{"user", "addresses", "rate_mbps"?, "quota"?, "used"?, "period"?}], "replace"?: bool}.

    Each entry is a user's plan and every address the user holds now (an
    entry without a tier and without a quota, or without addresses, takes
    the user out of the table); with "replace" the list is the complete
    set.  An address belongs to the last user that names it.  The user id
    never reaches the table: the helper names its quota by a hash.
    """
    validate.obj(args, "", ("users", "replace"), ("users",))
    users = {}
    claimed = set()
    for item, entry in validate.items(args["users"], "users", validate.MAX_PEERS, "users"):
        validate.obj(entry, item + ".", ("user", "addresses", "rate_mbps", "quota", "used", "period"),
                     ("user", "addresses"))
        name = validate.user(entry["user"], item + ".user")
        if name in users:
            raise Invalid(item + ".user", "is listed twice")
        addresses = validate.unique([(f, validate.host_address(v, _pools(s), f)) for f, v in validate.items(
            entry["addresses"], item + ".addresses", validate.MAX_ALLOWED_IPS, "addresses")])
        for index, address in enumerate(addresses):
            if address in claimed:
                raise Invalid("%s.addresses[%d]" % (item, index), "is also another user's")
            claimed.add(address)
        users[name] = {"addresses": addresses, "rate_mbps": validate.rate_mbps(entry.get("rate_mbps"),
                                                                               item + ".rate_mbps"),
                       "quota": validate.quota_bytes(entry.get("quota"), item + ".quota"),
                       "used": validate.integer(entry.get("used", 0), 0, validate.MAX_COUNTER, item + ".used"),
                       "period": validate.integer(entry.get("period", 0), 0, validate.MAX_COUNTER, item + ".period")}
    return {"users": users, "replace": validate.boolean(args.get("replace", False), "replace")}


def dump_peers(args, s, own=()):
    """{}: every peer.  {"limit"}: a walk's first page (wghelper/peers.py Pages); {"dump", "offset",
    "limit"}: a later one."""
    allowed = ("limit", "dump", "offset")
    if not validate.obj(args, "", allowed):
        return {}
    validate.obj(args, "", allowed, allowed if "dump" in args or "offset" in args else ("limit",))
    result = {"limit": validate.integer(args["limit"], 1, validate.MAX_PEERS, "limit")}
    if "dump" in args:
        result.update(dump=validate.integer(args["dump"], 1, validate.MAX_COUNTER, "dump"),
                      offset=validate.integer(args["offset"], 0, validate.MAX_PEERS, "offset"))
    return result


def usage(args, s, own=()):
    """{"since"?: {"boot", "taken_at"}, "fresh"?: bool}: per-peer counters changed since an earlier answer."""
    validate.obj(args, "", ("since", "fresh"))
    since = args.get("since")
    if since is not None:
        validate.obj(since, "since.", ("boot", "taken_at"), ("boot", "taken_at"))
        since = {"boot": validate.boot_id(since["boot"], "since.boot"),
                 "taken_at": validate.seconds_mark(since["taken_at"], "since.taken_at")}
    return {"since": since, "fresh": validate.boolean(args.get("fresh", False), "fresh")}


COMMANDS = {
    "hello": no_args,        # who the helper is: key, interface, generation
    "status": no_args,       # hello plus live peer count and traffic
    "apply_peers": apply_peers,
    "dump_peers": dump_peers,  # every peer with handshake and traffic (never the private key), or a page
    "sync_peers": sync_peers,
    "bridge_up": bridge_up,
    "bridge_down": bridge_down,
    "bridge_rules": bridge_rules,
    "limits": limits,        # speed tiers and quota backstops in the nftables table (wghelper/limits.py)
    "usage": usage,          # per-peer byte counters for the app's accounting (wghelper/usage.py)
}
