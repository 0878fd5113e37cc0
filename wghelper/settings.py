"""Settings both processes read, and the one loader for them.

Values come from defaults, then the KEY=VALUE file named by
ORBMESH_CONFIG_FILE, then ORBMESH_* environment variables, then (tests
only) overrides; an empty value means "use the default", as in systemd
files.  Each table maps a name (without the ORBMESH_ prefix) to
(parser, default, description); docs/configuration.md lists them all.

SHARED is read by the app and the helper, so the two can never disagree
about the interface, the pool or the socket.  HELPER is the helper's own.
The app adds its own table in app/config.py and parses it with parse().

Standard library only: the app's workers import this module.
"""
import grp
import ipaddress
import os
import pwd
import re

from .errors import ConfigError

PREFIX = "ORBMESH_"
IFNAME_RE = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")
# nftables table name.  nft's parser takes no quoted or digit-first table
# names, so the first character is a letter or "_" (a keyword such as
# "chain" still fails, loudly, when the helper applies the table).
NFT_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_ENV_LINE_RE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")

__all__ = ["ConfigError"]


def read_env_file(path):
    """Parse a systemd EnvironmentFile-style KEY=VALUE file into a dict.

    Raises OSError if the file cannot be read and ValueError (with the line
    number) for a line that is not KEY=VALUE, so a typo is not silently lost.
    """
    values = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            match = _ENV_LINE_RE.match(line)
            if not match:
                raise ValueError("%s:%d: expected KEY=VALUE" % (path, number))
            key, value = match.group(1), match.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    return values


# --- parsers: a string from a file or the environment, or a plain value from tests

def number(cast, low, high, unit=""):
    def parse(value):
        try:
            found = cast(value)
        except (TypeError, ValueError):
            raise ValueError("must be a number" + (" of %s" % unit if unit else "")) from None
        if not low <= found <= high:  # also refuses nan
            raise ValueError("must be between %s and %s%s" % (low, high, " " + unit if unit else ""))
        return found
    return parse


def integer(low, high):
    return number(int, low, high)


def seconds(low, high):
    return number(float, low, high, "seconds")


def matching(pattern, message):
    def parse(value):
        if not pattern.fullmatch(str(value)) or value in (".", ".."):
            raise ValueError(message)
        return value
    return parse


def choice(*options):
    return matching(re.compile("|".join(map(re.escape, options))), "must be one of %s" % ", ".join(options))


def text(value):
    return str(value).strip()


ifname = matching(IFNAME_RE, "must be 1-15 characters of A-Z a-z 0-9 _ = + . -")
nft_table = matching(NFT_TABLE_RE, "must be 1-32 characters of A-Z a-z 0-9 _, not starting with a digit")
abspath = matching(re.compile(r"/.*"), "must be an absolute path")


def network(cls, what):
    def parse(value):
        try:
            return cls(value, strict=True)
        except ValueError as exc:
            raise ValueError("must be an %s network in CIDR form (%s)" % (what, exc)) from None
    return parse


def pool4(value):
    pool = network(ipaddress.IPv4Network, "IPv4")(value)
    if pool.prefixlen > 30:  # room for the network, gateway, broadcast and one client
        raise ValueError("must be an IPv4 network of /30 or larger")
    return pool


# fc00::/7: unique-local addresses (RFC 4193), the only pools NAT66 masquerades.
ULA = ipaddress.IPv6Network("fc00::/7")
AUTO = "auto"
# What IPv6 the node gives its clients (the helper decides at start, wghelper/ipv6.py, and names it in
# its hello): "forward": a /128 each, forwarded (net.ipv6.conf.all.forwarding is 1); "local": none, the
# kernel would drop their IPv6 silently (forwarding is 0); "off": ORBMESH_POOL6=off.
IPV6_FORWARD, IPV6_LOCAL, IPV6_OFF = "forward", "local", "off"


def pool6(value):
    """A routed prefix, "off" (None), or "auto": the node's own unique-local /64 (wghelper/keys.py ensure_ula)."""
    if value in (AUTO, "off"):
        return AUTO if value == AUTO else None
    return network(ipaddress.IPv6Network, "IPv6")(value)


def address6(pool, pool6, address):
    """The address at `address`'s offset from the start of `pool`, in `pool6`: one row, two addresses."""
    return pool6.network_address + (int(address) - int(pool.network_address))


def listed(parse_one):
    """A comma- or space-separated list of `parse_one` values."""
    def parse(value):
        return tuple(parse_one(item) for item in (value.replace(",", " ").split() if isinstance(value, str) else value))
    return parse


def port_or_off(value):
    """A TCP port, or "off" (None)."""
    return None if value == "off" else integer(1, 65535)(value)


def networks4(value):
    return tuple(network(ipaddress.IPv4Network, "IPv4")(item.strip()) for item in str(value).split(",") if item.strip())


def address(value):
    try:
        return ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise ValueError("must be an IP address") from None


def _account(lookup, kind, name):
    if name.isdigit():
        return int(name)
    try:
        return lookup(name)
    except KeyError:
        raise ValueError("no such %s: %s" % (kind, name)) from None


def group(value):
    return _account(lambda n: grp.getgrnam(n).gr_gid, "group", value)


def uids(value):
    found = frozenset(_account(lambda n: pwd.getpwnam(n).pw_uid, "user", item.strip())
                      for item in value.split(",") if item.strip())
    if not found:
        raise ValueError("must list at least one uid or user name")
    return found


SHARED = {
    "INTERFACE": (ifname, "wg0", "WireGuard interface name"),
    "LISTEN_PORT": (integer(1, 65535), 51820, "WireGuard listen port on the interface"),
    "POOL": (pool4, "10.8.0.0/16", "Client address pool (IPv4 CIDR, /30 or larger)"),
    "GATEWAY": (address, None, "Gateway address on the interface (default: first host of POOL)"),
    "POOL6": (pool6, AUTO, "Client IPv6 pool: auto (a unique-local /64 made once), a routed prefix, or off"),
    "MTU": (integer(576, 9000), 1420, "Tunnel MTU"),
    "HELPER_SOCKET": (abspath, "/run/orbmesh/wghelper.sock", "Unix socket of the root helper"),
    "DNS_RESOLVER": (choice("on", "off"), "on", "Run the node's DNS resolver (Unbound) on the gateway addresses"),
}

HELPER = {
    "HELPER_SOCKET_GROUP": (group, None, "Group of the helper socket (the app's group; default: the helper's)"),
    "HELPER_ALLOWED_UIDS": (uids, "0", "Uids or user names allowed on the helper socket, comma-separated"),
    "HELPER_STATE_DIR": (abspath, "/var/lib/orbmesh-wghelper", "Helper state: server and bridge keys (0700)"),
    "WG_BACKEND": (choice("auto", "kernel", "userspace", "external"), "auto",
                   "auto: kernel WireGuard, else wireguard-go; kernel; userspace (wireguard-go); external: the "
                   "link is made outside the helper (orbmesh-wireguard-go@IF.service), which only configures it"),
    "WIREGUARD_GO": (text, "wireguard-go", "The wireguard-go program"),
    "HELPER_COMMAND_TIMEOUT": (seconds(0.1, 600), 10.0, "Longest run of one wg/ip/nft/sysctl command, seconds"),
    "HELPER_WATCH_INTERVAL": (seconds(0.05, 3600), 1.0, "How often the helper checks its interface, seconds"),
    "HELPER_MAX_CONNECTIONS": (integer(1, 4096), 256, "Concurrent connections to the helper socket (32 per API instance)"),
    "NAT_UPLINK": (ifname, None, "Uplink interface to masquerade clients out of (empty: no NAT, no forwarding)"),
    "NAT_TABLE": (nft_table, "orbmesh", "The helper's nftables table (inet family)"),
    "CLIENT_TO_CLIENT": (choice("on", "off"), "off", "Let tunnel clients reach each other"),
    "ALLOWED_DESTINATIONS": (listed(network(ipaddress.ip_network, "IP")), None,
                             "CIDRs clients may reach despite the blocked ranges (empty: none)"),
    "CLIENT_NODE_PORTS": (listed(integer(1, 65535)), None,
                          "TCP ports of the node itself clients may reach through the tunnel (empty: none)"),
    "CLIENT_API_PORT": (port_or_off, 8443,
                        "TCP port the node publishes its API on (nginx's), reachable through the tunnel so an app "
                        "can disconnect while connected; off: closed"),
    "BRIDGE_TABLE_BASE": (integer(256, 2 ** 31 - 1024), 51900,
                          "Routing table of bridge slot N is this + N"),
    "BRIDGE_RULE_PREF": (integer(1, 32765), 20000, "Priority of the policy rules of bridged clients"),
    "BRIDGE_NETWORKS": (networks4, "", "IPv4 CIDRs, comma-separated, this server's address on an exit may come "
                        "from (the exits' pools); empty: bridge mode is off"),
}


def gather(environ=None, overrides=None):
    """Raw values by name (prefix removed): file, then environment, then overrides."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    raw = {}
    path = overrides.get("CONFIG_FILE") or environ.get(PREFIX + "CONFIG_FILE")
    if path:
        try:
            raw.update(read_env_file(path))
        except OSError as exc:
            raise ConfigError("%sCONFIG_FILE: cannot read %s (%s)" % (PREFIX, path, exc.strerror)) from None
        except ValueError as exc:
            raise ConfigError("%sCONFIG_FILE: %s" % (PREFIX, exc)) from None
    raw.update(environ)
    values = {k[len(PREFIX):]: v for k, v in raw.items() if k.startswith(PREFIX)}
    values.update(overrides)
    return values


def parse(table, raw):
    """{name: parsed value} for every name of `table`; None where unset without a default."""
    values = {}
    for name, (parser, default, _) in table.items():
        value = raw.get(name)
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "":
            value = default
        if value is None:
            values[name] = None
            continue
        try:
            values[name] = parser(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError("%s%s: %s" % (PREFIX, name, exc)) from None
    return values


def load_shared(raw):
    """SHARED parsed, with the gateway derived from and checked against the pool."""
    values = parse(SHARED, raw)
    pool, gateway = values["POOL"], values["GATEWAY"]
    if gateway is None:
        gateway = values["GATEWAY"] = pool.network_address + 1
    if gateway not in pool or gateway in (pool.network_address, pool.broadcast_address):
        raise ConfigError("%sGATEWAY: must be a host address inside %s" % (PREFIX, pool))
    if isinstance(values["POOL6"], ipaddress.IPv6Network) and values["POOL6"].num_addresses < pool.num_addresses:
        raise ConfigError("%sPOOL6: must be a /%d or larger, to hold an address for each of %s"
                          % (PREFIX, 96 + pool.prefixlen, pool))
    return values


class Settings(dict):
    """The helper's settings; settings.helper_state_dir is settings["HELPER_STATE_DIR"]: the lower-case name."""

    def __getattr__(self, name):
        try:
            return self[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def gateway6(self):
        """The gateway's offset in POOL6 (None while IPv6 is off, or its pool is not made yet)."""
        return address6(self.pool, self.pool6, self.gateway) if isinstance(self.pool6, ipaddress.IPv6Network) else None

    @property
    def ipv6_mode(self):
        """IPV6_FORWARD, IPV6_LOCAL or IPV6_OFF: the mode __main__ decided at start (IPV6_MODE; without
        one, as in unit tests, forward whenever there is a pool6)."""
        if self.pool6 is None:
            return IPV6_OFF
        return self.get("IPV6_MODE") or IPV6_FORWARD

    @property
    def clients6(self):
        """(pool6, gateway6) that clients' addresses come from: (None, None) unless IPv6 is forwarded."""
        return (self.pool6, self.gateway6) if self.ipv6_mode == IPV6_FORWARD else (None, None)


def load(environ=None, overrides=None):
    """The helper's Settings (SHARED and HELPER); ConfigError naming the bad variable."""
    raw = gather(environ, overrides)
    values = Settings(load_shared(raw), **parse(HELPER, raw))
    if values["NAT_UPLINK"] == values["INTERFACE"]:
        raise ConfigError("%sNAT_UPLINK: must not be the WireGuard interface (%s)" % (PREFIX, values["INTERFACE"]))
    return values
