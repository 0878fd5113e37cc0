"""Validators for everything the app sends.  Pure functions, no I/O.

Every value that ends up in an argv passes through here first and comes
out normalised (the string we put in the argv is the one we produced, not
the one we received).  Each function raises Invalid(field, message); the
message never repeats more than a few characters of what was sent, so a
private key pasted by mistake does not end up in replies or logs.

Standard library only: the app's workers import this module.
"""
import base64
import ipaddress
import re
import socket

from .errors import Invalid

MAX_PEERS = 65536
MAX_ALLOWED_IPS = 8

# 32 bytes in standard base64 is 43 characters and one "=";  the last
# character can only carry 4 bits, so its low 2 bits must be zero.
# Matched with fullmatch: "$" alone would also accept a trailing newline.
PUBLIC_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
_ENDPOINT_RE = re.compile(r"^([0-9]{1,3}(?:\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})$")
PEER_KEYS = frozenset({"public_key", "allowed_ips", "endpoint", "keepalive", "last_endpoint"})
# The Curve25519 points of small order (libsodium's list: 0, 1, two of order 8, p - 1, p, p + 1), each also
# with the top bit set, which X25519 ignores.  As a peer's key one makes the handshake's shared secret
# predictable; no client has one.
LOW_ORDER_KEYS = frozenset(base64.b64encode(raw[:31] + bytes([raw[31] | top])).decode() for raw in map(bytes.fromhex, (
    "00" * 32, "01" + "00" * 31, "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157", "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f", "ee" + "ff" * 30 + "7f")) for top in (0, 0x80))

# Every range that is not the internet: what a client may never reach
# through the node (wghelper/firewall.py) and what the node's resolver never
# queries or hands back (app/dns/unbound.py).  This network, RFC 1918, CGNAT,
# loopback, link-local (the metadata service), IETF protocol assignments,
# benchmarking, multicast, reserved and broadcast; IPv6 unspecified,
# loopback, IPv4-mapped, NAT64 (well-known and local-use: they reach IPv4
# behind a provider's NAT64), discard-only, 6to4, unique-local, link-local,
# multicast.
NOT_INTERNET = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2002::/16", "fc00::/7",
    "fe80::/10", "ff00::/8"))
# Not globally routable either, but the internet of the tests (and of
# documentation): never blocked.
DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))


def is_internet(net):
    """Whether a network (say, one the host is connected to) is the internet: globally routable or a
    documentation range, and in none of NOT_INTERNET."""
    net = ipaddress.ip_network(net, strict=False)
    if any(net.version == n.version and net.subnet_of(n) for n in DOCUMENTATION):
        return True
    return net.is_global and not any(net.version == n.version and net.overlaps(n) for n in NOT_INTERNET)


__all__ = ["Invalid"]


def _hint(value):
    """A short, safe description of a rejected value."""
    if isinstance(value, str):
        prefix = "".join(c if c.isprintable() else "?" for c in value[:6])
        return "%r..." % prefix if len(value) > 6 else repr(prefix)
    return "a %s" % type(value).__name__


def obj(value, field, allowed, required=()):
    """`value` if it is an object with no key but `allowed` and every one of `required`; a key's field is
    `field` + key (so `field` is "" or ends in ".")."""
    if not isinstance(value, dict):
        raise Invalid(field.rstrip(".") or "args", "must be an object")
    for key in sorted(str(k)[:40] for k in set(value) - set(allowed))[:1]:  # the app's names, cut short
        raise Invalid(field + key, "unknown argument")
    for key in required:
        if key not in value:
            raise Invalid(field + key, "is required")
    return value


def items(values, field, high, what, low=0):
    """(field[i], value) for a list of low to high values."""
    if not isinstance(values, list):
        raise Invalid(field, "must be a list")
    if not low <= len(values) <= high:
        raise Invalid(field, "must hold %d to %d %s" % (low, high, what))
    return [("%s[%d]" % (field, i), v) for i, v in enumerate(values)]


def unique(pairs, suffix=""):
    """The values of (field, value) pairs; refused if one repeats."""
    seen = set()
    for field, value in pairs:
        if value in seen:
            raise Invalid(field + suffix, "is listed twice")
        seen.add(value)
    return [value for _, value in pairs]


def integer(value, low, high, field):
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(field, "must be an integer")
    if not low <= value <= high:
        raise Invalid(field, "must be between %d and %d" % (low, high))
    return value


def boolean(value, field):
    if not isinstance(value, bool):
        raise Invalid(field, "must be true or false")
    return value


def public_key(value, field="public_key", own=()):
    """A peer's key: base64 of 32 bytes, never a low-order point nor one of `own` (the server's and bridge's)."""
    # The pattern admits only base64 that decodes to exactly 32 bytes.
    if not isinstance(value, str) or not PUBLIC_KEY_RE.fullmatch(value):
        raise Invalid(field, "must be a base64 WireGuard key of 32 bytes, got %s" % _hint(value))
    if value in LOW_ORDER_KEYS or value in own:
        raise Invalid(field, "is a low-order point or this server's own key, not a peer's")
    return value


def key_list(values, field, high=MAX_PEERS):
    return unique([(f, public_key(v, f)) for f, v in items(values, field, high, "keys")])


def _canonical_host_route(value, pools):
    """`value` when it is a host route already in canonical form, inside its pool and none of its reserved
    addresses; None means: ask client_ip's ipaddress path, which also names what is wrong.  By integers:
    ipaddress took 0.3 ms a peer, 19 s to check a sync of 60,000 peers on a loaded machine
    (bench/recovery.py), on a helper thread that every other request then waited behind."""
    address, _, prefix = value.partition("/")
    family, bits = (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)
    if prefix != str(bits) or "." in address and bits == 128:
        return None
    try:
        packed = socket.inet_pton(family, address)
    except OSError:
        return None
    if socket.inet_ntop(family, packed) != address:
        return None  # not canonical ("010.8.0.2", "FD00::2", "fd00:0::2"): normalised by the slow path
    pool, gateway = next((p for p in pools if p[0] is not None and p[0].max_prefixlen == bits), (None, None))
    number = int.from_bytes(packed, "big")
    if pool is None or not int(pool.network_address) < number < int(pool.broadcast_address) or (
            gateway is not None and number == int(gateway)):
        return None
    return value


def client_ip(value, pools, field):
    """A host route inside the pool of its family ("10.8.0.2/32", "fd00::2/128"), normalised; never the
    network, gateway or broadcast.  `pools`: (pool, gateway) pairs, IPv4 first; a None pool is off."""
    # No scope id ("fd00::5%a"): ipaddress keeps it, and the address then equals no reserved one.
    if not isinstance(value, str) or "/" not in value or "%" in value:
        raise Invalid(field, "must be a host route such as 10.8.0.2/32, got %s" % _hint(value))
    fast = _canonical_host_route(value, pools)
    if fast is not None:
        return fast
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise Invalid(field, "is not a valid address, got %s" % _hint(value)) from None
    pool, gateway = next((p for p in pools if p[0] is not None and p[0].version == net.version), pools[0])
    if net.version != pool.version or net.prefixlen != net.max_prefixlen:
        raise Invalid(field, "must be a /%d host route" % pool.max_prefixlen)
    if net.network_address not in pool:
        raise Invalid(field, "must be inside %s" % pool)
    if net.network_address in (pool.network_address, gateway, pool.broadcast_address):
        raise Invalid(field, "is the network, gateway or broadcast address")
    return str(net)


def client_address(value, pool, gateway, field):
    """A client's address in the pool, without prefix ("10.8.0.2")."""
    if not isinstance(value, str):
        raise Invalid(field, "must be a string")
    return client_ip("%s/%d" % (value, pool.max_prefixlen), [(pool, gateway)], field).split("/")[0]


# Where WireGuard may never be told to send: nowhere (0.0.0.0/8 and "::"
# as destinations mean this host), everyone (multicast; IPv4 broadcast and
# the reserved 240/4 it ends), or this host's own services (loopback).
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_network("240.0.0.0/4")


def _not_a_peer(address, loopback):
    """Why `address` cannot be a peer's endpoint, or None; an IPv4-mapped IPv6 address as its IPv4 one."""
    for ip in {address, getattr(address, "ipv4_mapped", None) or address}:
        if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
            return "an unspecified address"
        if ip.is_multicast:
            return "a multicast address"
        if ip.version == 4 and ip in _BROADCAST:
            return "a broadcast or reserved address"
        if ip.is_loopback and not loopback:
            return "a loopback address"
    return None


def endpoint(value, field="endpoint", loopback=False):
    """None, "IPv4:port" or "[IPv6]:port"; IP literals only, we never resolve.

    Never loopback, broadcast, multicast or unspecified, also written as
    IPv4-mapped IPv6 ("[::ffff:127.0.0.1]"): a peer is another host.
    `loopback` admits loopback for where the interface last saw a peer
    (last_endpoint) only: a client over the WebSocket or HTTP tunnel comes
    from the app's own socket on loopback, and going back there is how
    that client gets its session back after the interface was lost.
    """
    if value is None:
        return None
    match = _ENDPOINT_RE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise Invalid(field, "must be IPv4:port or [IPv6]:port, got %s" % _hint(value))
    try:
        address = ipaddress.ip_address(match.group(1).strip("[]"))
    except ValueError:
        raise Invalid(field, "is not a valid IP address") from None
    if not 1 <= int(match.group(2)) <= 65535:
        raise Invalid(field, "port must be between 1 and 65535")
    kind = _not_a_peer(address, loopback)
    if kind:
        raise Invalid(field, "must be the unicast address of another host, not %s" % kind)
    return ("[%s]:%d" if address.version == 6 else "%s:%d") % (address, int(match.group(2)))


def last_endpoint(value, field="last_endpoint"):
    """Where the interface last saw a peer: an endpoint() that may be loopback (the app's tunnel sockets)."""
    return endpoint(value, field, loopback=True)


def keepalive(value, field="keepalive"):
    return integer(value, 0, 65535, field)


def peer(value, pools, field="peer", own=()):
    """One peer as {"public_key", "allowed_ips", "endpoint", "keepalive", "last_endpoint"}.

    ``last_endpoint`` (sync only) is where the peer was last seen: used only
    when the peer is put back on an interface that lost it (peers.py).
    """
    obj(value, field + ".", PEER_KEYS, ("public_key", "allowed_ips"))
    ips = items(value["allowed_ips"], field + ".allowed_ips", MAX_ALLOWED_IPS, "addresses", low=1)
    return {
        "public_key": public_key(value["public_key"], field + ".public_key", own),
        "allowed_ips": unique([(f, client_ip(v, pools, f)) for f, v in ips]),
        "endpoint": endpoint(value.get("endpoint"), field + ".endpoint"),
        "keepalive": keepalive(value.get("keepalive", 0), field + ".keepalive"),
        "last_endpoint": last_endpoint(value.get("last_endpoint"), field + ".last_endpoint"),
    }


def peers(values, pools, field="peers", own=()):
    """A list of peers; no key and no address twice."""
    result = [peer(v, pools, f, own) for f, v in items(values, field, MAX_PEERS, "peers")]
    unique([("%s[%d]" % (field, i), p["public_key"]) for i, p in enumerate(result)], ".public_key")
    unique([("%s[%d]" % (field, i), ip) for i, p in enumerate(result) for ip in p["allowed_ips"]], ".allowed_ips")
    return result


def tunnel_address(value, networks, field="address"):
    """This server's IPv4 address in an exit's pool: one of `networks` (ORBMESH_BRIDGE_NETWORKS, the exits' pools)."""
    try:
        address = ipaddress.IPv4Address(value if isinstance(value, str) else "")
    except ValueError:
        raise Invalid(field, "must be an IPv4 address, got %s" % _hint(value)) from None
    # Inside them, an address is a unicast host unless the operator listed odd networks; bridge.py also
    # refuses one that is local or on a connected network.
    if not any(address in net for net in networks):
        raise Invalid(field, "must lie inside ORBMESH_BRIDGE_NETWORKS (%s)" % (
            ", ".join(map(str, networks)) or "empty, so bridge mode is off"))
    return str(address)


# --- usage and limits (wghelper/limits.py, wghelper/usage.py) ---------------------

# The one identifier pattern: a userUuid, a token's sub and device_id, an exit's id, in both processes.
IDENTIFIER = "[A-Za-z0-9_.:@-]{1,128}"
IDENTIFIER_RE = re.compile(r"\A%s\Z" % IDENTIFIER)
USER_RE = IDENTIFIER_RE  # the app's userUuid
BOOT_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MIN_RATE_MBPS, MAX_RATE_MBPS = 1, 100_000          # a tier from 1 Mbit/s to 100 Gbit/s
MAX_QUOTA_BYTES = 10 ** 15                          # a petabyte a period: anything above is a typo
MAX_COUNTER = 2 ** 62


def user(value, field="user"):
    """A user id as the app knows it (userUuid, a token's sub); it never reaches an argv or a rule."""
    if not isinstance(value, str) or not USER_RE.fullmatch(value):
        raise Invalid(field, "must be 1-128 characters of A-Z a-z 0-9 _ . : @ -, got %s" % _hint(value))
    return value


def rate_mbps(value, field="rate_mbps"):
    """None (no tier) or a tier in whole Mbit/s."""
    return None if value is None else integer(value, MIN_RATE_MBPS, MAX_RATE_MBPS, field)


def quota_bytes(value, field="quota"):
    """None (no quota) or the bytes a user may move in a period."""
    return None if value is None else integer(value, 0, MAX_QUOTA_BYTES, field)


def host_address(value, pools, field):
    """A client's address without prefix ("10.8.0.2", "fd00::2") in the pool of its family, normalised."""
    if not isinstance(value, str) or "/" in value:
        raise Invalid(field, "must be a client address such as 10.8.0.2, got %s" % _hint(value))
    return client_ip("%s/%d" % (value, 128 if ":" in value else 32), pools, field).split("/")[0]


def seconds_mark(value, field):
    """A point on the host's monotonic clock (seconds, a finite number >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2 ** 53:
        raise Invalid(field, "must be a number of seconds")
    return float(value)


def boot_id(value, field="boot"):
    if not isinstance(value, str) or not BOOT_ID_RE.fullmatch(value):
        raise Invalid(field, "must be a boot id (/proc/sys/kernel/random/boot_id), got %s" % _hint(value))
    return value
