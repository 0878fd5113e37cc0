"""Validators for everything the app sends.  Pure functions, no I/O.

Every value that ends up in an argv passes through here first and comes
out normalised (the string we put in the argv is the one we produced, not
the one we received).  Each function raises Invalid(field, message); the
message never repeats more than a few characters of what was sent, so a
private key pasted by mistake does not end up in replies or logs.
"""
import base64
import binascii
import ipaddress
import re

MAX_PEERS = 65536
MAX_ALLOWED_IPS = 8

# 32 bytes in standard base64 is 43 characters and one "=";  the last
# character can only carry 4 bits, so its low 2 bits must be zero.
# Matched with fullmatch: "$" alone would also accept a trailing newline.
PUBLIC_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
_ENDPOINT_V4_RE = re.compile(r"^([0-9]{1,3}(?:\.[0-9]{1,3}){3}):([0-9]{1,5})$")
_ENDPOINT_V6_RE = re.compile(r"^\[([0-9A-Fa-f:.]{2,45})\]:([0-9]{1,5})$")
PEER_KEYS = frozenset({"public_key", "allowed_ips", "endpoint", "keepalive"})


class Invalid(ValueError):
    def __init__(self, field, message):
        super().__init__("%s: %s" % (field, message))
        self.field = field
        self.message = message


def _hint(value):
    """A short, safe description of a rejected value."""
    if isinstance(value, str):
        prefix = "".join(c if c.isprintable() else "?" for c in value[:6])
        return "%r..." % prefix if len(value) > 6 else repr(prefix)
    return "a %s" % type(value).__name__


def public_key(value, field="public_key"):
    if not isinstance(value, str):
        raise Invalid(field, "must be a string, got %s" % _hint(value))
    if not PUBLIC_KEY_RE.fullmatch(value):
        raise Invalid(field, "must be a base64 WireGuard key of 32 bytes, got %s" % _hint(value))
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(field, "is not valid base64") from None
    if len(raw) != 32:
        raise Invalid(field, "must decode to 32 bytes")
    return value


def client_ips(values, pool, gateway, field="allowed_ips"):
    """Host routes inside the pool, returned as normalised CIDR strings."""
    if not isinstance(values, list):
        raise Invalid(field, "must be a list")
    if not 1 <= len(values) <= MAX_ALLOWED_IPS:
        raise Invalid(field, "must hold 1 to %d addresses" % MAX_ALLOWED_IPS)
    result = []
    for index, value in enumerate(values):
        item = "%s[%d]" % (field, index)
        if not isinstance(value, str) or "/" not in value:
            raise Invalid(item, "must be a host route such as 10.8.0.2/32, got %s" % _hint(value))
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError:
            raise Invalid(item, "is not a valid address, got %s" % _hint(value)) from None
        if net.version != pool.version or net.prefixlen != net.max_prefixlen:
            raise Invalid(item, "must be a /%d host route" % pool.max_prefixlen)
        address = net.network_address
        if address not in pool:
            raise Invalid(item, "must be inside %s" % pool)
        reserved = {pool.network_address, gateway}
        if pool.version == 4:
            reserved.add(pool.broadcast_address)
        if address in reserved:
            raise Invalid(item, "is the network, gateway or broadcast address")
        text = str(net)
        if text in result:
            raise Invalid(item, "is listed twice")
        result.append(text)
    return result


def endpoint(value, field="endpoint"):
    """None, "IPv4:port" or "[IPv6]:port"; IP literals only, we never resolve."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(field, "must be a string or null")
    match = _ENDPOINT_V4_RE.fullmatch(value) or _ENDPOINT_V6_RE.fullmatch(value)
    if not match:
        raise Invalid(field, "must be IPv4:port or [IPv6]:port, got %s" % _hint(value))
    try:
        address = ipaddress.ip_address(match.group(1))
    except ValueError:
        raise Invalid(field, "is not a valid IP address") from None
    port = int(match.group(2))
    if not 1 <= port <= 65535:
        raise Invalid(field, "port must be between 1 and 65535")
    if address.is_unspecified or address.is_multicast:
        raise Invalid(field, "must be a unicast address")
    if address.version == 6:
        return "[%s]:%d" % (address, port)
    return "%s:%d" % (address, port)


def keepalive(value, field="keepalive"):
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(field, "must be an integer")
    if not 0 <= value <= 65535:
        raise Invalid(field, "must be between 0 and 65535")
    return value


def peer(value, pool, gateway, field="peer"):
    """One peer as {"public_key", "allowed_ips", "endpoint", "keepalive"}."""
    if not isinstance(value, dict):
        raise Invalid(field, "must be an object")
    unknown = set(value) - PEER_KEYS
    if unknown:
        # Key names are sorted and cut short; they are the app's, not secrets.
        names = ", ".join(sorted(str(k)[:20] for k in unknown)[:5])
        raise Invalid(field, "unknown keys: %s" % names)
    for required in ("public_key", "allowed_ips"):
        if required not in value:
            raise Invalid("%s.%s" % (field, required), "is required")
    return {
        "public_key": public_key(value["public_key"], field + ".public_key"),
        "allowed_ips": client_ips(value["allowed_ips"], pool, gateway, field + ".allowed_ips"),
        "endpoint": endpoint(value.get("endpoint"), field + ".endpoint"),
        "keepalive": keepalive(value.get("keepalive", 0), field + ".keepalive"),
    }


def peers(values, pool, gateway, max=MAX_PEERS, min=0, field="peers"):  # noqa: A002
    if not isinstance(values, list):
        raise Invalid(field, "must be a list")
    if not min <= len(values) <= max:
        raise Invalid(field, "must hold %d to %d peers" % (min, max))
    result = []
    seen_keys = set()
    claimed = {}
    for index, value in enumerate(values):
        item = "%s[%d]" % (field, index)
        checked = peer(value, pool, gateway, item)
        if checked["public_key"] in seen_keys:
            raise Invalid(item + ".public_key", "is listed twice")
        seen_keys.add(checked["public_key"])
        for address in checked["allowed_ips"]:
            if address in claimed:
                raise Invalid(item + ".allowed_ips",
                              "%s is also claimed by %s[%d]" % (address, field, claimed[address]))
            claimed[address] = index
        result.append(checked)
    return result


def key_list(values, max=MAX_PEERS, min=0, field="public_keys"):  # noqa: A002
    if not isinstance(values, list):
        raise Invalid(field, "must be a list")
    if not min <= len(values) <= max:
        raise Invalid(field, "must hold %d to %d keys" % (min, max))
    result = []
    seen = set()
    for index, value in enumerate(values):
        key = public_key(value, "%s[%d]" % (field, index))
        if key in seen:
            raise Invalid("%s[%d]" % (field, index), "is listed twice")
        seen.add(key)
        result.append(key)
    return result


# --- bridge mode (wghelper/bridge.py) -------------------------------------

def slot(value, max_slots, field="slot"):
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(field, "must be an integer")
    if not 0 <= value < max_slots:
        raise Invalid(field, "must be between 0 and %d" % (max_slots - 1))
    return value


def tunnel_address(value, pool, field="address"):
    """This server's IPv4 address in an exit's pool: a unicast host outside our own pool."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", value):
        raise Invalid(field, "must be an IPv4 address, got %s" % _hint(value))
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise Invalid(field, "is not a valid IPv4 address") from None
    if (address.is_unspecified or address.is_multicast or address.is_loopback
            or address.is_link_local or address == ipaddress.IPv4Address("255.255.255.255")):
        raise Invalid(field, "must be a unicast host address")
    if pool.version == 4 and address in pool:
        raise Invalid(field, "must lie outside this server's pool %s" % pool)
    return str(address)


def bridge_rules(values, pool, gateway, max_slots, field="add"):
    """[{"address": "10.8.0.2", "slot": 0}, ...] -> {address: slot}; client addresses of the pool."""
    if not isinstance(values, list):
        raise Invalid(field, "must be a list")
    if len(values) > MAX_PEERS:
        raise Invalid(field, "must hold at most %d rules" % MAX_PEERS)
    result = {}
    for index, value in enumerate(values):
        item = "%s[%d]" % (field, index)
        if not isinstance(value, dict) or set(value) != {"address", "slot"}:
            raise Invalid(item, "must be an object with exactly address and slot")
        address = client_ips([value["address"] + "/32" if isinstance(value["address"], str)
                              else value["address"]], pool, gateway, item + ".address")[0]
        address = address.split("/")[0]
        if address in result:
            raise Invalid(item + ".address", "is listed twice")
        result[address] = slot(value["slot"], max_slots, item + ".slot")
    return result


def client_addresses(values, pool, gateway, field="remove"):
    if not isinstance(values, list):
        raise Invalid(field, "must be a list")
    if len(values) > MAX_PEERS:
        raise Invalid(field, "must hold at most %d addresses" % MAX_PEERS)
    result = []
    for index, value in enumerate(values):
        item = "%s[%d]" % (field, index)
        if not isinstance(value, str):
            raise Invalid(item, "must be a string")
        address = client_ips([value + "/32"], pool, gateway, item)[0].split("/")[0]
        if address in result:
            raise Invalid(item, "is listed twice")
        result.append(address)
    return result
