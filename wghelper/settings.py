"""Helper configuration: defaults, then ORBMESH_CONFIG_FILE, then the environment.

The app imports read_env_file from here, so this module must only use the
standard library (importing it must not pull in ``sh`` or the helper).
"""
import grp
import ipaddress
import os
import pwd
import re
from dataclasses import dataclass

PREFIX = "ORBMESH_"
IFNAME_RE = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")
# nftables table name.  nft's parser takes no quoted or digit-first table
# names, so the first character is a letter or "_" (a keyword such as
# "chain" still fails, loudly, when the helper applies the table).
NFT_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_ENV_LINE_RE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")

DEFAULTS = {
    "INTERFACE": "wg0",
    "LISTEN_PORT": "51820",
    "POOL": "10.8.0.0/16",
    "GATEWAY": "",
    "MTU": "1420",
    "HELPER_SOCKET": "/run/orbmesh/wghelper.sock",
    "HELPER_SOCKET_GROUP": "",
    "HELPER_ALLOWED_UIDS": "0",
    "HELPER_STATE_DIR": "/var/lib/orbmesh-wghelper",
    "WG_BACKEND": "auto",
    "WIREGUARD_GO": "wireguard-go",
    "HELPER_COMMAND_TIMEOUT": "10",
    "HELPER_WATCH_INTERVAL": "2",
    "HELPER_MAX_CONNECTIONS": "256",
    "NAT_UPLINK": "",
    "NAT_TABLE": "orbmesh",
    "POOL6": "",
    "BRIDGE_TABLE_BASE": "51900",
    "BRIDGE_RULE_PREF": "20000",
}


class ConfigError(Exception):
    """A setting is malformed; the message names the variable."""


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


@dataclass(frozen=True)
class Settings:
    interface: str
    listen_port: int
    pool: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address
    mtu: int
    socket_path: str
    socket_group: int | None
    allowed_uids: frozenset
    state_dir: str
    backend: str
    wireguard_go: str
    command_timeout: float
    watch_interval: float
    max_connections: int
    # NAT and forwarding (wghelper/nat.py); no uplink means none of it.
    nat_uplink: str | None = None
    nat_table: str = "orbmesh"
    pool6: ipaddress.IPv6Network | None = None
    # Bridge (multi-hop) mode (wghelper/bridge.py): routing table of slot N
    # is bridge_table_base + N; every client rule has priority bridge_rule_pref.
    bridge_table_base: int = 51900
    bridge_rule_pref: int = 20000


def _int(value, low, high):
    try:
        number = int(value, 10)
    except ValueError:
        raise ValueError("must be an integer") from None
    if not low <= number <= high:
        raise ValueError("must be between %d and %d" % (low, high))
    return number


def _seconds(value, low, high):
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not low <= number <= high:  # also refuses nan
        raise ValueError("must be between %g and %g seconds" % (low, high))
    return number


def _interface(value):
    if not IFNAME_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError("must be 1-15 characters of A-Z a-z 0-9 _ = + . -")
    return value


def _pool(value):
    try:
        pool = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError("must be a network in CIDR form (%s)" % exc) from None
    # Room for the network, gateway, broadcast and at least one client.
    if pool.num_addresses < 4:
        raise ValueError("is too small: need at least 4 addresses")
    return pool


def _gateway(value, pool):
    if not value:
        return pool.network_address + 1
    try:
        gateway = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IP address") from None
    if gateway not in pool or gateway in (pool.network_address, pool.broadcast_address):
        raise ValueError("must be a host address inside %s" % pool)
    return gateway


def _uplink(value, interface):
    if not value:
        return None
    _interface(value)
    if value == interface:
        raise ValueError("must not be the WireGuard interface (%s)" % interface)
    return value


def _nft_table(value):
    if not NFT_TABLE_RE.fullmatch(value):
        raise ValueError("must be 1-32 characters of A-Z a-z 0-9 _, not starting with a digit")
    return value


def _pool6(value):
    if not value:
        return None
    try:
        pool = ipaddress.IPv6Network(value, strict=True)
    except ValueError as exc:
        raise ValueError("must be an IPv6 network in CIDR form (%s)" % exc) from None
    return pool


def _group(value):
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError("no such group: %s" % value) from None


def _uids(value):
    uids = set()
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item.isdigit():
            uids.add(int(item))
            continue
        try:
            uids.add(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise ValueError("no such user: %s" % item) from None
    if not uids:
        raise ValueError("must list at least one uid or user name")
    return frozenset(uids)


def _choice(value, options):
    if value not in options:
        raise ValueError("must be one of %s" % ", ".join(options))
    return value


def _path(value):
    if not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return value


def load(environ=None):
    """Build Settings; raise ConfigError naming the variable that is wrong."""
    environ = os.environ if environ is None else environ
    raw = {}
    config_file = environ.get(PREFIX + "CONFIG_FILE")
    if config_file:
        try:
            raw.update(read_env_file(config_file))
        except OSError as exc:
            raise ConfigError("%sCONFIG_FILE: cannot read %s (%s)"
                              % (PREFIX, config_file, exc.strerror)) from None
        except ValueError as exc:
            raise ConfigError("%sCONFIG_FILE: %s" % (PREFIX, exc)) from None
    raw.update({k: v for k, v in environ.items() if k.startswith(PREFIX)})

    def get(name):
        value = str(raw.get(PREFIX + name, "")).strip()
        # An empty variable means "use the default", as in systemd files.
        return value if value else DEFAULTS[name]

    values = {}
    current = None

    def parse(name, func, *extra):
        nonlocal current
        current = name
        return func(get(name), *extra)

    try:
        values["interface"] = parse("INTERFACE", _interface)
        values["listen_port"] = parse("LISTEN_PORT", _int, 1, 65535)
        values["pool"] = parse("POOL", _pool)
        values["gateway"] = parse("GATEWAY", _gateway, values["pool"])
        values["mtu"] = parse("MTU", _int, 576, 9000)
        values["socket_path"] = parse("HELPER_SOCKET", _path)
        current = "HELPER_SOCKET_GROUP"
        group = str(raw.get(PREFIX + current, "")).strip()
        values["socket_group"] = _group(group)
        values["allowed_uids"] = parse("HELPER_ALLOWED_UIDS", _uids)
        values["state_dir"] = parse("HELPER_STATE_DIR", _path)
        values["backend"] = parse("WG_BACKEND", _choice, ("auto", "kernel", "userspace"))
        values["wireguard_go"] = get("WIREGUARD_GO")
        values["command_timeout"] = parse("HELPER_COMMAND_TIMEOUT", _seconds, 0.1, 600)
        values["watch_interval"] = parse("HELPER_WATCH_INTERVAL", _seconds, 0.05, 3600)
        values["max_connections"] = parse("HELPER_MAX_CONNECTIONS", _int, 1, 65536)
        current = "NAT_UPLINK"  # empty is a value here: no NAT (the default)
        values["nat_uplink"] = _uplink(str(raw.get(PREFIX + current, "")).strip(),
                                       values["interface"])
        values["nat_table"] = parse("NAT_TABLE", _nft_table)
        current = "POOL6"
        values["pool6"] = _pool6(str(raw.get(PREFIX + current, "")).strip())
        # Clear of the kernel's own tables (253-255) for every slot.
        values["bridge_table_base"] = parse("BRIDGE_TABLE_BASE", _int, 256, 2**31 - 1024)
        values["bridge_rule_pref"] = parse("BRIDGE_RULE_PREF", _int, 1, 32765)
    except ValueError as exc:
        raise ConfigError("%s%s: %s" % (PREFIX, current, exc)) from None
    return Settings(**values)
