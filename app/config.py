"""Settings: defaults, then the ORBMESH_CONFIG_FILE file, then ORBMESH_* variables.

The settings the helper reads too (interface, pool, ports, MTU, socket)
come from its shared table, wghelper/settings.py SHARED, parsed by the same
code, so the two processes cannot disagree; APP below are the app's own.
SETTINGS is both; docs/configuration.md lists every one of them.
"""
import ipaddress
import os
from pathlib import Path

from wghelper import settings as shared
from wghelper.errors import ConfigError
from wghelper.validate import IDENTIFIER, IDENTIFIER_RE

PREFIX = shared.PREFIX

# Secrets that must never reach production; compared case-insensitively.
PLACEHOLDER_SECRETS = {
    "", "secret", "changeme", "change-me", "change_me", "changethis",
    "placeholder", "your-secret", "your_secret", "jwt_secret", "test",
    "password", "default", "example", "xxx",
}
MIN_SECRET_BYTES = 32
MIN_API_KEY_CHARS = 16
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA")
_USER_ID = IDENTIFIER_RE  # a userUuid, as the API accepts it

__all__ = ["ConfigError", "SETTINGS", "load", "check_secrets"]

_int = shared.integer
_float = shared.seconds
_choice = shared.choice
_str = shared.text


def _list(value):
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [item.strip() for item in str(value).split(",") if item.strip()]


def _networks(value):
    return [str(ipaddress.ip_network(item, strict=False)) for item in _list(value)]


def _addresses(value):
    return [str(ipaddress.ip_address(item)) for item in _list(value)]


def _proxies(value):
    return [item if item == "unix" else str(ipaddress.ip_address(item)) for item in _list(value)]


def _address(value):
    return str(ipaddress.ip_address(str(value).strip()))


def _flag(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


# name: (parser, default, description).  None as default means "derived" or "unset".
APP = {
    "PUBLIC_HOST": (_str, "127.0.0.1", "Host or IP clients use to reach WireGuard (serverEndpoint)"),
    "PUBLIC_PORT": (_int(1, 65535), None, "UDP port in serverEndpoint (default: LISTEN_PORT)"),
    "DNS": (_addresses, None, "DNS servers for clients (default: GATEWAY,1.1.1.1; 1.1.1.1 with DNS_RESOLVER off)"),
    "DNS_UPSTREAM": (_addresses, "", "Resolvers Unbound forwards to, comma-separated IPs (empty: it resolves recursively)"),
    "DNS_DNSSEC": (_choice("on", "off"), "on", "Unbound validates DNSSEC answers (off: no validation)"),
    "KEEPALIVE": (_int(0, 65535), 25, "Persistent keepalive for clients, seconds (0 = off)"),
    "CLIENT_ALLOWED_IPS": (_networks, "0.0.0.0/0,::/0", "allowedIPs handed to clients"),
    "DB_PATH": (_str, "/var/lib/orbmesh/orbmesh.db", "SQLite database file"),
    "HELPER_TIMEOUT": (_float(0.1, 120), 5.0, "Seconds to wait for the helper"),
    "JWT_ALGORITHM": (_choice(*JWT_ALGORITHMS), "HS256", "The only algorithm accepted for device tokens"),
    "JWT_SECRET": (_str, "", "Shared secret for HS* device tokens"),
    "JWT_SECRET_FILE": (_str, "", "File holding JWT_SECRET (wins over JWT_SECRET)"),
    "JWT_PUBLIC_KEY_FILE": (_str, "", "PEM public key for RS256/ES256/EdDSA"),
    "JWT_ISSUER": (_str, "orbnet", "Required iss claim"),
    "JWT_AUDIENCE": (_str, "", "Required aud claim (empty: not checked)"),
    "JWT_LEEWAY": (_int(0, 300), 30, "Clock leeway for exp/nbf/iat, seconds"),
    "API_KEYS": (_list, "", "Internal API keys, comma-separated (several for rotation)"),
    "API_KEYS_FILE": (_str, "", "File with one internal API key per line (added to API_KEYS)"),
    "SCOPED_API_KEYS": (_list, "", "API keys that may only add and remove the peers of one userUuid (an entry's bridge key on this exit): KEY=userUuid, comma-separated"),
    "SCOPED_API_KEYS_FILE": (_str, "", "File with one KEY=userUuid per line (added to SCOPED_API_KEYS)"),
    "MAX_BODY_BYTES": (_int(256, 16 * 1024 * 1024), 65536, "Largest accepted request body"),
    "WS_PING_INTERVAL": (_float(1, 3600), 20.0, "WebSocket tunnel: ping every this many seconds; no pong by the next one closes"),
    "WS_IDLE_TIMEOUT": (_float(1, 86400), 300.0, "WebSocket tunnel: close after this long without a WireGuard datagram either way (junk, pings and pongs do not count), seconds"),
    "TUNNEL_MAX_SESSIONS": (_int(1, 1000), 4, "Tunnel sessions per device (both transports, per worker)"),
    "TUNNEL_HOLD": (_float(0, 120), 20.0, "HTTP tunnel: longest wait for downstream datagrams, seconds"),
    "TUNNEL_MAX_BODY": (_int(1024, 16 * 1024 * 1024), 1048576, "HTTP tunnel: largest request body"),
    "TUNNEL_MAX_RESPONSE": (_int(65537, 16 * 1024 * 1024), 1048576, "HTTP tunnel: largest response body"),
    "TUNNEL_QUEUE": (_int(1, 65536), 1024, "HTTP tunnel: downstream datagrams queued per session (oldest dropped)"),
    "TUNNEL_MAX_PARKED": (_int(1, 1000), 8, "HTTP tunnel: long polls one device may have waiting at once (per worker); one more answers the oldest"),
    "TUNNEL_SESSION_IDLE": (_float(1, 86400), 60.0, "HTTP tunnel: close a session after this long without a request, seconds"),
    "TUNNEL_TARGET_HOST": (_address, "127.0.0.1", "Where the tunnels reach WireGuard (with LISTEN_PORT)"),
    "PROBE_PORT": (_int(0, 65535), 51822, "UDP port of the relay's probe echo, beside WireGuard's (0 = off)"),
    "PROBE_HOST": (_address, "::", "Address the probe echo binds (::: every IPv6 and IPv4 address)"),
    "PROBE_KEY_FILE": (_str, None, "Secret behind the probe tickets, made at first use (default: probe.key beside DB_PATH)"),
    "RECONCILE_INTERVAL": (_float(0, 86400), 300.0, "Full reconcile at least this often (up to half of it early, to share the sweep's dump of the interface), seconds (0 = only on change)"),
    "RECONCILE_CHECK_INTERVAL": (_float(0, 3600), 1.0, "How often to ask the helper whether its interface is new, seconds (0 = no watcher)"),
    "LOG_LEVEL": (_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", "Log level"),
    "LOG_FORMAT": (_choice("json", "text"), "json", "Log lines: one JSON object each, or plain text"),
    "TRUSTED_PROXIES": (_proxies, "127.0.0.1,::1", "Peers whose X-Real-IP header is believed (IPs; unix: a Unix socket peer)"),
    "EXIT_REGISTRY_URL": (_str, "", "OrbNET URL of the exit-server registry (JSON), polled"),
    "EXIT_REGISTRY_API_KEY": (_str, "", "X-API-Key sent with each registry fetch (empty: none)"),
    "EXIT_REGISTRY_FILE": (_str, "", "Exit-server registry as a local JSON file (used when no URL is set)"),
    "EXIT_REGISTRY_INTERVAL": (_float(0.1, 86400), 300.0, "Fetch the registry URL this often, seconds"),
    "EXIT_REGISTRY_CACHE": (_str, None, "Last good copy of the registry (default: exit-registry.json beside DB_PATH)"),
    "EXIT_API_TIMEOUT": (_float(0.1, 120), 5.0, "Seconds one call to an exit server's API or the registry URL may take in all"),
    "EXIT_ALLOW_HTTP": (_flag, False, "Accept plain http:// for the exit registry URL and exits' apiUrl (tests, private links); otherwise https only"),
    "EXIT_CA_FILE": (_str, "", "CA certificates (PEM) that exits' and the registry's https certificates must chain to (empty: the system's)"),
    "BRIDGE_IDLE_GRACE": (_float(0, 86400), 300.0, "Take an exit tunnel down this long after its last client left, seconds"),
    "BRIDGE_EXITS_PER_DEVICE": (_int(0, 64), 4, "Exits one device may use within BRIDGE_IDLE_GRACE (0 = no limit)"),
    "BRIDGE_EXITS_PER_USER": (_int(0, 64), 8, "Exits all devices of one user may use within BRIDGE_IDLE_GRACE (0 = no limit)"),
    "SMARTCONNECT_POLICY": (_str, "", "SmartConnect policy file (JSON); empty: direct unless exitServerId is given"),
    "SMARTCONNECT_HEALTH_TTL": (_float(0, 3600), 30.0, "How long an exit's /health answer is trusted, seconds"),
    "DB_BUSY_TIMEOUT": (_float(0, 120), 10.0, "Seconds a write waits for the database lock before a 503 DATABASE_UNAVAILABLE"),
    "STALE_AFTER": (_float(0, 365 * 86400), 604800.0, "Quarantine a client peer after this long without a handshake, seconds (0 = never sweep)"),
    "QUARANTINE": (_float(0, 365 * 86400), 86400.0, "A quarantined peer keeps its address this long before it is freed, seconds"),
    "SWEEP_INTERVAL": (_float(1, 86400), 300.0, "Stale-peer sweep runs this often (once across all workers; up to half of it early, to share the drift check's dump of the interface), seconds"),
    "USAGE_INTERVAL": (_float(0, 3600), 2.0, "Count usage from the interface's counters this often (once across all workers; longer when a count would take more than 1% of a core, or its wireguard-go dump hold the interface's changes more than 0.25% of the time), seconds (0 = no counting, no quota cuts)"),
    "AUDIT_LOG": (_str, None, "Audit log file, JSON lines (default: audit.log beside DB_PATH; off: no audit log)"),
    "AUDIT_MAX_BYTES": (_int(1024, 2 ** 40), 10485760, "Rotate the audit log when it would pass this size, bytes"),
    "AUDIT_BACKUPS": (_int(1, 1000), 10, "Rotated audit log files kept (audit.log.1 is the newest)"),
    "RATE_LIMIT_WINDOW": (_float(1, 86400), 60.0, "Rate-limit window, seconds"),
    "CONNECT_RATE_LIMIT": (_int(0, 1000000), 20, "Connects per device per window (0 = no limit)"),
    "TUNNEL_RATE_LIMIT": (_int(0, 1000000), 30, "New tunnel sessions (WebSocket or HTTP) per device per window (0 = no limit)"),
    "MAX_DEVICES_PER_USER": (_int(0, 1000000), 0, "Client devices one user may hold peers for (0 = no cap)"),
}
SETTINGS = {**shared.SHARED, **APP}


def _read_secret_file(path, name):
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError("%s%s: cannot read %s (%s)" % (PREFIX, name, path, exc.strerror)) from None


def load(environ=None, overrides=None):
    """Build the settings dict; raise ConfigError naming the bad setting."""
    raw = shared.gather(environ, overrides)
    values = shared.load_shared(raw)
    values.update(shared.parse(APP, raw))
    # The app hands these out in JSON and compares them as text.
    values["POOL"], values["GATEWAY"] = str(values["POOL"]), str(values["GATEWAY"])
    return _derive(values)


def _derive(s):
    if s["PUBLIC_PORT"] is None:
        s["PUBLIC_PORT"] = s["LISTEN_PORT"]
    if s["AUDIT_LOG"] is None:
        s["AUDIT_LOG"] = os.path.join(os.path.dirname(os.path.abspath(s["DB_PATH"])), "audit.log")
    if s["JWT_SECRET_FILE"]:
        s["JWT_SECRET"] = _read_secret_file(s["JWT_SECRET_FILE"], "JWT_SECRET_FILE")
    if s["JWT_PUBLIC_KEY_FILE"]:
        s["JWT_PUBLIC_KEY"] = _read_secret_file(s["JWT_PUBLIC_KEY_FILE"], "JWT_PUBLIC_KEY_FILE")
    else:
        s["JWT_PUBLIC_KEY"] = ""
    if s["PROBE_KEY_FILE"] is None:
        s["PROBE_KEY_FILE"] = os.path.join(os.path.dirname(os.path.abspath(s["DB_PATH"])), "probe.key")
    if s["EXIT_REGISTRY_CACHE"] is None:
        s["EXIT_REGISTRY_CACHE"] = os.path.join(os.path.dirname(os.path.abspath(s["DB_PATH"])), "exit-registry.json")
    if s["API_KEYS_FILE"]:
        text = _read_secret_file(s["API_KEYS_FILE"], "API_KEYS_FILE")
        s["API_KEYS"] = s["API_KEYS"] + [line.strip() for line in text.splitlines() if line.strip()]
    scoped = s["SCOPED_API_KEYS"]
    if s["SCOPED_API_KEYS_FILE"]:
        text = _read_secret_file(s["SCOPED_API_KEYS_FILE"], "SCOPED_API_KEYS_FILE")
        lines = [line.strip() for line in text.splitlines()]
        scoped = scoped + [line for line in lines if line and not line.startswith("#")]
    s["SCOPED_API_KEYS"] = _scoped_keys(scoped)
    if s["EXIT_REGISTRY_URL"].lower().startswith("http://") and not s["EXIT_ALLOW_HTTP"]:
        raise ConfigError("%sEXIT_REGISTRY_URL: must be https:// (it carries the exits' API keys); "
                          "%sEXIT_ALLOW_HTTP=true allows http:// on a private link" % (PREFIX, PREFIX))
    return s


def _scoped_keys(items):
    """["KEY=userUuid", ...] -> {key: userUuid}; errors name the entry by its place, never the key."""
    found = {}
    for index, item in enumerate(items, 1):
        key, equals, user = item.rpartition("=")
        key, user = key.strip(), user.strip()
        problem = None
        if not equals or not key:
            problem = "is not KEY=userUuid"
        elif not _USER_ID.match(user):
            problem = "has a userUuid outside %s" % IDENTIFIER
        elif key in found:
            problem = "names the same key twice"
        if problem:
            raise ConfigError("%sSCOPED_API_KEYS: entry %d %s" % (PREFIX, index, problem))
        found[key] = user
    return found


def check_secrets(s):
    """Refuse to run with a missing, short or placeholder secret or key."""
    if s["JWT_ALGORITHM"].startswith("HS"):
        secret = s["JWT_SECRET"]
        if secret.lower() in PLACEHOLDER_SECRETS or len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                "%sJWT_SECRET: set a random secret of at least %d bytes "
                "(empty and placeholder values are refused)" % (PREFIX, MIN_SECRET_BYTES))
    elif not s["JWT_PUBLIC_KEY"]:
        raise ConfigError("%sJWT_PUBLIC_KEY_FILE: required for %s" % (PREFIX, s["JWT_ALGORITHM"]))
    for key in s["API_KEYS"]:
        if key.lower() in PLACEHOLDER_SECRETS or len(key) < MIN_API_KEY_CHARS:
            raise ConfigError("%sAPI_KEYS: every key needs at least %d characters and must not be a placeholder"
                              % (PREFIX, MIN_API_KEY_CHARS))
    for index, key in enumerate(s["SCOPED_API_KEYS"], 1):
        if key.lower() in PLACEHOLDER_SECRETS or len(key) < MIN_API_KEY_CHARS:
            raise ConfigError("%sSCOPED_API_KEYS: entry %d: every key needs at least %d characters and must not "
                              "be a placeholder" % (PREFIX, index, MIN_API_KEY_CHARS))
        if key in s["API_KEYS"]:
            raise ConfigError("%sSCOPED_API_KEYS: entry %d is also a full key in %sAPI_KEYS"
                              % (PREFIX, index, PREFIX))
