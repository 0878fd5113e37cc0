"""Marshmallow schemas for every request and response, and the shared fields.

Views call ``load_body(schema)`` and get a clean dict; nothing else reads
the request body.
"""
import ipaddress
import json

from flask import current_app, request
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from wghelper import validate as validate_helper
from wghelper.settings import IPV6_FORWARD, IPV6_LOCAL, IPV6_OFF

from .errors import ApiError

# The same rules as validate_helper.IDENTIFIER_RE for /openapi.json, in the ECMA-262 dialect JSON Schema
# uses (no \A or \Z there).
_ID_DOC = {"pattern": "^%s$" % validate_helper.IDENTIFIER}
_KEY_DOC = {"pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$", "example": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="}


class WireGuardKey(fields.String):
    """Standard base64 of exactly 32 bytes, as `wg genkey | wg pubkey` prints.

    The helper's own validator decides, so the app never accepts a key the
    helper would refuse.  Whether it is one of the server's own keys is the
    connect's question (app/peers/lifecycle.py, from the hello the app
    already holds): validation asks nothing.
    """

    default_error_messages = {"key": "Must be a WireGuard key: base64 of exactly 32 bytes, not a low-order point "
                                     "nor this server's own key."}

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            return validate_helper.public_key(value)
        except validate_helper.Invalid:
            raise self.make_error("key") from None


class StrictBoolean(fields.Boolean):
    """Only JSON true/false; "yes", 1 and "true" are type errors."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class HostPort(fields.String):
    """An IP literal and a port: 192.0.2.7:51820 or [2001:db8::7]:51820 (the helper's rule, which also
    refuses this host's loopback and broadcast, multicast or unspecified addresses: a peer is another host)."""

    default_error_messages = {"hostport": "Must be IP:port of another host, with [brackets] around IPv6; no host "
                                          "names, and no loopback, broadcast, multicast or unspecified address."}

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            return validate_helper.endpoint(value)
        except validate_helper.Invalid:
            raise self.make_error("hostport") from None


def _identifier(**kwargs):
    return fields.String(validate=validate.Regexp(validate_helper.IDENTIFIER_RE,
                                                  error="Must be 1-128 characters of A-Z a-z 0-9 _ . : @ -."),
                         metadata=_ID_DOC, **kwargs)


def pool_host(value, field):
    """Parse an address and check it is a client address of the pool."""
    pool = ipaddress.ip_network(current_app.config["POOL"])
    gateway = ipaddress.ip_address(current_app.config["GATEWAY"])
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValidationError("Must be an IPv4 address.", field) from None
    if address not in pool:
        raise ValidationError("Must lie inside the pool %s." % pool, field)
    if address in (pool.network_address, pool.broadcast_address, gateway):
        raise ValidationError("The network, gateway and broadcast addresses are reserved.", field)
    return address


class ConnectSchema(Schema):
    publicKey = WireGuardKey(required=True, metadata=_KEY_DOC)
    exitServerId = _identifier()
    force_direct = StrictBoolean(load_default=False)


class EmptySchema(Schema):
    """Bodies that carry nothing: `{}` or no body at all."""


class AddPeerSchema(Schema):
    userUuid = _identifier(required=True)
    publicKey = WireGuardKey(required=True, metadata=_KEY_DOC)
    allowedIPs = fields.String(required=True, validate=validate.Length(max=128), metadata={
        "description": "The assignedIP as a /32, optionally with the peer's own IPv6 /128 (docs/api.md)",
        "example": "10.8.0.42/32"})
    assignedIP = fields.String(required=True, validate=validate.Length(max=15), metadata={
        "description": "An IPv4 address of the pool; the peer's IPv6 address follows from it", "example": "10.8.0.42"})
    endpoint = HostPort(load_default=None, allow_none=True)
    noKeepalive = StrictBoolean(load_default=False)

    @validates_schema
    def _in_pool(self, data, **kwargs):
        address = pool_host(data["assignedIP"], "assignedIP")
        data["assignedIP"] = str(address)
        try:
            networks = {ipaddress.ip_network(item.strip()) for item in data["allowedIPs"].split(",")}
        except ValueError:
            raise ValidationError("Must be CIDRs separated by commas.", "allowedIPs") from None
        ipv6 = {net for net in networks if net.version == 6}
        if networks - ipv6 != {ipaddress.IPv4Network(address)}:
            raise ValidationError("Must be exactly the assignedIP as a /32 (e.g. %s/32)." % address, "allowedIPs")
        # The peer gets its /128 in any case (one row, two addresses); naming it is optional.  Whether
        # it is that one depends on the helper's pools: the add-peer's question (app/peers/lifecycle.py).
        data["allowedIPs6"] = ipv6


class RemovePeerSchema(Schema):
    userUuid = _identifier(required=True)
    # Our extension (the reference is silent): only the user's peer with this key.
    publicKey = WireGuardKey(metadata=_KEY_DOC)


# Responses (documented in /openapi.json; views build them as plain dicts).

class ErrorBodySchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Dict()


class ErrorSchema(Schema):
    success = fields.Boolean(required=True, metadata={"example": False})
    error = fields.Nested(ErrorBodySchema, required=True)


class MessageSchema(Schema):
    success = fields.Boolean(required=True)
    message = fields.String(required=True)


class RemovePeerResponseSchema(MessageSchema):
    removed = fields.Integer(required=True)


class ConnectResponseSchema(Schema):
    success = fields.Boolean(required=True)
    publicKey = fields.String(required=True)
    serverPublicKey = fields.String(required=True)
    ip = fields.String(required=True, metadata={"example": "10.8.0.42/32"})
    gateway = fields.String(required=True)
    serverEndpoint = fields.String(required=True)
    dns = fields.List(fields.String(), required=True)
    allowedIPs = fields.List(fields.String(), required=True)
    mtu = fields.Integer(required=True)
    keepalive = fields.Integer(required=True)
    mode = fields.String(required=True, validate=validate.OneOf(["direct", "bridge"]))
    exitServerId = fields.String(required=True, allow_none=True)
    ip6 = fields.String(required=True, allow_none=True, metadata={
        "example": "fd12:3456:789a::2a/128",
        "description": "The client's IPv6 address: pool6 plus its IPv4 offset. null: IPv6 off or not forwarded "
                       "(ipv6 mode off or local), or a bridged session"})
    gateway6 = fields.String(required=True, allow_none=True, metadata={
        "example": "fd12:3456:789a::1", "description": "The IPv6 gateway, null when ip6 is"})


class StatusResponseSchema(Schema):
    success = fields.Boolean(required=True)
    publicKey = fields.String(required=True)
    peerCount = fields.Integer(required=True)
    gateway6 = fields.String(allow_none=True, metadata={"description": "The IPv6 gateway; null: peers get no IPv6"})


class ProbeTicketSchema(Schema):
    success = fields.Boolean(required=True)
    port = fields.Integer(required=True, metadata={"description": "UDP port of the probe echo (ORBMESH_PROBE_PORT)"})
    ticket = fields.String(required=True, metadata={"description": "base64 of the 20-byte ticket every probe carries"})
    key = fields.String(required=True, metadata={"description": "base64 of the 32-byte key the probes' MAC uses"})
    expiresIn = fields.Integer(required=True, metadata={"description": "seconds the ticket is good for"})
    serverTime = fields.Float(required=True, metadata={"description": "the server's clock (unix seconds): probes "
                                                                      "carry their send time in it"})


class WireguardHealthSchema(Schema):
    interface = fields.String(required=True)
    running = fields.Boolean(required=True)
    port = fields.Integer(allow_none=True)
    publicKey = fields.String(allow_none=True)
    peerCount = fields.Integer(allow_none=True)
    mtu = fields.Integer(allow_none=True)
    rxBytes = fields.Integer(allow_none=True)
    txBytes = fields.Integer(allow_none=True)
    backend = fields.String(allow_none=True)
    gateway6 = fields.String(allow_none=True)
    ipv6 = fields.String(allow_none=True, validate=validate.OneOf([IPV6_FORWARD, IPV6_LOCAL, IPV6_OFF]), metadata={
        "description": "What IPv6 clients get: forward (their /128), local (none: the node does not forward "
                       "IPv6), off (ORBMESH_POOL6=off); null: the helper did not answer"})


class ComponentHealthSchema(Schema):
    ok = fields.Boolean(required=True)
    error = fields.String()


class ResolverHealthSchema(Schema):
    enabled = fields.Boolean(required=True)
    address = fields.String()
    ok = fields.Boolean()
    error = fields.String()


class HealthSchema(Schema):
    success = fields.Boolean(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["healthy", "degraded", "unhealthy"]))
    # The details, only with an internal API key (app/ops/health.py).
    wireguard = fields.Nested(WireguardHealthSchema)
    database = fields.Nested(ComponentHealthSchema)
    helper = fields.Nested(ComponentHealthSchema)
    resolver = fields.Nested(ResolverHealthSchema)
    error = fields.Nested(ErrorBodySchema)


# Usage, speed tiers and quotas (app/peers/usage.py, app/api/usage_view.py).

class StrictInteger(fields.Integer):
    """Only a JSON integer: no 20.0, "20" or true."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class LimitsSchema(Schema):
    userUuid = _identifier(required=True)
    rateMbps = StrictInteger(allow_none=True, validate=validate.Range(1, 100_000, error=(
        "Must be a speed tier from 1 Mbit/s to 100 Gbit/s (1 to 100000), or null to clear it.")), metadata={
        "description": "Speed tier in Mbit/s, each direction, each address of the user; null clears it, absent "
                       "leaves it", "example": 20})
    quotaBytes = StrictInteger(allow_none=True, validate=validate.Range(0, 10 ** 15, error=(
        "Must be 0 to 10^15 bytes, or null to clear it.")), metadata={
        "description": "Data allowance of the period, up and down together; null clears it, absent leaves it",
        "example": 50000000000})
    resetUsage = StrictBoolean(load_default=False, metadata={"description": "Start a new usage period"})


class UsageQuerySchema(Schema):
    userUuid = _identifier()
    cursor = fields.String(validate=validate.Length(1, 200))
    limit = StrictInteger(validate=validate.Range(1, 1000), metadata={"description": "users per page (1000)"})

    @validates_schema
    def _one_or_pages(self, data, **kwargs):
        if "userUuid" in data and ("cursor" in data or "limit" in data):
            raise ValidationError("Ask for one userUuid, or page with cursor and limit; not both.", "userUuid")


class DeviceUsageSchema(Schema):
    deviceId = fields.String(required=True, allow_none=True, metadata={"description": "null for an OrbNET peer"})
    source = fields.String(required=True, validate=validate.OneOf(["client", "orbnet"]))
    publicKey = fields.String(required=True, allow_none=True)
    bytesUp = fields.Integer(required=True, metadata={"description": "bytes the node received from the device"})
    bytesDown = fields.Integer(required=True)
    bytes = fields.Integer(required=True)
    lastHandshake = fields.String(required=True, allow_none=True, metadata={"example": "2026-12-01T10:00:00Z"})
    transport = fields.String(required=True, allow_none=True, validate=validate.OneOf(["udp", "ws", "http"]))
    connected = fields.Boolean(required=True)
    state = fields.String(required=True, validate=validate.OneOf(["active", "quota", "quarantined", "disconnected"]))


class UsageTotalSchema(Schema):
    bytesUp = fields.Integer(required=True)
    bytesDown = fields.Integer(required=True)
    bytes = fields.Integer(required=True)


class LimitsFromSchema(Schema):
    rateMbps = fields.String(required=True, allow_none=True, validate=validate.OneOf(["api", "token"]))
    quotaBytes = fields.String(required=True, allow_none=True, validate=validate.OneOf(["api", "token"]))


class UserUsageSchema(Schema):
    userUuid = fields.String(required=True)
    period = fields.Integer(required=True)
    periodStart = fields.String(required=True, allow_none=True, metadata={"description": "null: never seen"})
    rateMbps = fields.Integer(required=True, allow_none=True)
    quotaBytes = fields.Integer(required=True, allow_none=True)
    limitsFrom = fields.Nested(LimitsFromSchema, required=True)
    state = fields.String(required=True, validate=validate.OneOf(["active", "quota_exceeded"]))
    total = fields.Nested(UsageTotalSchema, required=True)
    devices = fields.List(fields.Nested(DeviceUsageSchema), required=True)


class UserUsageResponseSchema(UserUsageSchema):
    success = fields.Boolean(required=True)


class UsagePageSchema(Schema):
    success = fields.Boolean(required=True)
    users = fields.List(fields.Nested(UserUsageSchema), required=True)
    nextCursor = fields.String(required=True, allow_none=True)


def load_query(schema):
    """The query string, one value per name, loaded with `schema` (unknown or repeated names are refused)."""
    given = request.args.to_dict(flat=False)
    repeated = sorted(name for name, values in given.items() if len(values) > 1)
    if repeated:
        raise ValidationError({name: ["Give this parameter once."] for name in repeated})
    values = {name: values[0] for name, values in given.items()}
    if "limit" in values:  # a query string has no numbers: only digits make one here
        values["limit"] = int(values["limit"]) if values["limit"].isdigit() and len(values["limit"]) < 8 else \
            values["limit"]
    return schema.load(values)


def _reject_constant(name):
    raise ValueError(name)


def load_body(schema):
    """Decode the JSON body (an absent body counts as {}) and load it with `schema`."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        data = {}
    else:
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise ApiError("VALIDATION_ERROR", "Malformed JSON body") from None
    if not isinstance(data, dict):
        raise ApiError("VALIDATION_ERROR", "The JSON body must be an object")
    return schema.load(data)
