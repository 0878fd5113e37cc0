"""Exit servers for bridge mode: the registry, and the client of their API.

The registry comes from ORBMESH_EXIT_REGISTRY_URL (OrbNET; fetched every
EXIT_REGISTRY_INTERVAL seconds, by the reconcile watcher and on demand) or
from ORBMESH_EXIT_REGISTRY_FILE (read again when it changes)::

    {"exits": [{"id": "de-fra-1", "endpoint": "198.51.100.1:51820",
                "publicKey": "<exit's WireGuard key>", "apiUrl": "https://198.51.100.1",
                "apiKey": "<an X-API-Key of the exit>", "bridgeAddress": "10.9.255.1"}]}

``bridgeAddress`` is this server's address in the exit's pool, chosen by
OrbNET (which knows every pair of servers).  Entries that do not validate
are skipped with a log line naming the entry and the fields, never the
values.  The last good copy is kept in memory and in EXIT_REGISTRY_CACHE
(0600: it holds API keys) and used while OrbNET does not answer, also
after a restart.
"""
import json
import logging
import os
import threading
import time

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from wghelper.validate import IDENTIFIER_RE

from ..api.schemas import HostPort, WireGuardKey
from ..failures import BridgeUnavailable
from .httpjson import request as http_json
from .httpjson import tls_context

log = logging.getLogger(__name__)


class ExitSchema(Schema):
    class Meta:
        unknown = EXCLUDE  # OrbNET may send more than we use

    id = fields.String(required=True, validate=validate.Regexp(IDENTIFIER_RE))
    endpoint = HostPort(required=True)
    publicKey = WireGuardKey(required=True)
    apiUrl = fields.Url(required=True, schemes={"http", "https"}, require_tld=False)
    apiKey = fields.String(required=True, validate=validate.Length(min=16, max=512))
    bridgeAddress = fields.IPv4(required=True)


exit_schema = ExitSchema()


def parse(document, allow_http=False):
    """{"exits": [...]} (or a bare list) -> {id: exit dict}; bad entries are logged and skipped.

    An exit's apiUrl must be https (the call carries its API key) unless
    `allow_http` (EXIT_ALLOW_HTTP: tests, private links).
    """
    entries = document.get("exits") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ValueError("the registry must be a list of exits or {\"exits\": [...]}")
    exits = {}
    for index, entry in enumerate(entries):
        try:
            item = exit_schema.load(entry if isinstance(entry, dict) else {})
        except ValidationError as exc:
            name = entry.get("id") if isinstance(entry, dict) and isinstance(entry.get("id"), str) else None
            log.warning("exit registry: skipping entry %d (%s): bad %s", index,
                        name[:64] if name else "no id", ", ".join(sorted(exc.messages)))
            continue
        address = item["bridgeAddress"]
        if address.is_multicast or address.is_unspecified or address.is_loopback:
            log.warning("exit registry: skipping entry %d (%s): bad bridgeAddress", index, item["id"])
            continue
        if not allow_http and not item["apiUrl"].lower().startswith("https://"):
            log.warning("exit registry: skipping entry %d (%s): bad apiUrl (http:// needs "
                        "ORBMESH_EXIT_ALLOW_HTTP)", index, item["id"])
            continue
        item["bridgeAddress"] = str(address)
        item["apiUrl"] = item["apiUrl"].rstrip("/")
        if item["id"] in exits:
            log.warning("exit registry: skipping entry %d (%s): duplicate id", index, item["id"])
            continue
        exits[item["id"]] = item
    return exits


class Registry:
    def __init__(self, config):
        self.url = config["EXIT_REGISTRY_URL"]
        self.api_key = config.get("EXIT_REGISTRY_API_KEY") or None
        self.shown_url = self.url.split("?")[0]  # for logs: a query string may carry a token
        self.file = config["EXIT_REGISTRY_FILE"]
        self.cache = config["EXIT_REGISTRY_CACHE"]
        self.interval = config["EXIT_REGISTRY_INTERVAL"]
        self.timeout = config["EXIT_API_TIMEOUT"]
        self.allow_http = config.get("EXIT_ALLOW_HTTP", False)
        self.tls = tls_context(config.get("EXIT_CA_FILE", ""))
        self.exits = {}
        self._fetched = None     # monotonic time of the last attempt
        self._source_key = None  # the file's (mtime, size) last read
        self._failing = False
        self._document = None    # the last document fetched, to skip unchanged ones
        self._lock = threading.Lock()
        if self.url:
            self._load_cache()

    @property
    def configured(self):
        return bool(self.url or self.file)

    def get(self, exit_id):
        self.refresh()
        return self.exits.get(exit_id)

    def refresh(self, force=False):
        """Fetch or re-read the source when due; failures keep the last good copy."""
        if not self.configured:
            return
        with self._lock:
            if self.url:
                now = time.monotonic()
                if force or self._fetched is None or now - self._fetched >= self.interval:
                    self._fetched = now
                    self._fetch()
            else:
                self._read_file()

    def _fetch(self):
        try:
            status, document = http_json("GET", self.url, self.timeout, api_key=self.api_key, context=self.tls)
            if status != 200 or document is None:
                raise OSError("HTTP %s" % status)
            if document == self._document and not self._failing:
                return  # unchanged: no re-parse, no repeated log lines
            exits = parse(document, self.allow_http)
        except (OSError, ValueError) as exc:
            if not self._failing:
                log.warning("exit registry: %s does not answer (%s); keeping the last good copy (%d exits)",
                            self.shown_url, exc, len(self.exits))
            self._failing = True
            return
        if self._failing or exits.keys() != self.exits.keys():
            log.info("exit registry: %d exits from %s", len(exits), self.shown_url)
        self._failing = False
        self.exits = exits
        self._document = document
        self._save_cache(document)

    def _read_file(self):
        try:
            info = os.stat(self.file)
            key = (info.st_mtime_ns, info.st_size)
            if key == self._source_key:
                return
            with open(self.file, encoding="utf-8") as handle:
                self.exits = parse(json.load(handle), self.allow_http)
            self._source_key = key
            log.info("exit registry: %d exits from %s", len(self.exits), self.file)
        except (OSError, ValueError) as exc:
            log.warning("exit registry: cannot read %s (%s); keeping %d exits", self.file,
                        exc.__class__.__name__, len(self.exits))

    def _load_cache(self):
        try:
            with open(self.cache, encoding="utf-8") as handle:
                self.exits = parse(json.load(handle), self.allow_http)
            log.info("exit registry: %d exits from the cached copy %s", len(self.exits), self.cache)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("exit registry: ignoring the cached copy %s (%s)", self.cache, exc.__class__.__name__)

    def _save_cache(self, document):
        tmp = "%s.%d.tmp" % (self.cache, os.getpid())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle)
            os.replace(tmp, self.cache)
        except OSError as exc:
            log.warning("exit registry: cannot write the cached copy %s (%s)", self.cache, exc.strerror)


class ExitClient:
    """The exits' own API (an unmodified OrbMesh node), with their API keys."""

    def __init__(self, config):
        self.timeout = config["EXIT_API_TIMEOUT"]
        self.health_ttl = config["SMARTCONNECT_HEALTH_TTL"]
        self.tls = tls_context(config.get("EXIT_CA_FILE", ""))
        self._health = {}  # exit id -> (monotonic time, healthy)

    def _call(self, exit, path, body):
        try:
            return http_json("POST", exit["apiUrl"] + path, self.timeout, body, exit["apiKey"], self.tls)
        except OSError as exc:
            log.warning("exit %s: %s failed: %s", exit["id"], path, exc)
            raise BridgeUnavailable("Exit server %s cannot be reached" % exit["id"]) from None

    def register(self, exit, user, public_key):
        """Make this server a peer of the exit at bridgeAddress (add-peer is idempotent there)."""
        address = exit["bridgeAddress"]
        status, reply = self._call(exit, "/wireguard/add-peer", {
            "userUuid": user, "publicKey": public_key, "allowedIPs": address + "/32",
            "assignedIP": address, "noKeepalive": True})
        if status != 200:
            code = (reply or {}).get("error", {}).get("code") if isinstance(reply, dict) else None
            log.warning("exit %s: add-peer answered %s %s", exit["id"], status, code)
            raise BridgeUnavailable("Exit server %s refused the bridge (%s)"
                                    % (exit["id"], code or "HTTP %s" % status))

    def unregister(self, exit, user, public_key):
        """Remove our own peer from the exit: the user's peer with `public_key` (our remove-peer extension)."""
        status, _ = self._call(exit, "/wireguard/remove-peer", {"userUuid": user, "publicKey": public_key})
        if status not in (200, 404):
            raise BridgeUnavailable("Exit server %s: remove-peer answered %s" % (exit["id"], status))

    def healthy(self, exit):
        """The exit's /health says healthy or degraded; remembered SMARTCONNECT_HEALTH_TTL seconds."""
        now = time.monotonic()
        seen = self._health.get(exit["id"])
        if seen and now - seen[0] < self.health_ttl:
            return seen[1]
        try:
            status, reply = http_json("GET", exit["apiUrl"] + "/health", self.timeout, context=self.tls)
            ok = status == 200 and isinstance(reply, dict) and reply.get("status") in ("healthy", "degraded")
        except OSError:
            ok = False
        self._health[exit["id"]] = (now, ok)
        return ok


def init_app(app):
    app.extensions["orbmesh_exits"] = Registry(app.config)
    app.extensions["orbmesh_exit_client"] = ExitClient(app.config)
