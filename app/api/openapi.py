"""GET /openapi.json: the OpenAPI 3 document, generated from the schemas."""
import copy

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app

from orbmesh_relay.framing import BATCH_TYPE, SINGLE_TYPE

from . import schemas
from .errors import CODES

bp = Blueprint("openapi", __name__)

DEVICE = [{"deviceToken": []}]
INTERNAL = [{"apiKey": []}]


def _errors(*codes):
    """Error responses by status, each naming the codes it may carry."""
    by_status = {}
    for code in codes + ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE", "INTERNAL_ERROR", "DATABASE_UNAVAILABLE"):
        by_status.setdefault(CODES[code], []).append(code)
    return {str(status): {"description": " or ".join(sorted(set(names))), "content": {
        "application/json": {"schema": "Error"}}} for status, names in by_status.items()}


def _json(schema, description="OK"):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema, required=True):
    return {"required": required, "content": {"application/json": {"schema": schema}}}


HELPER = ("HELPER_UNAVAILABLE", "HELPER_ERROR")

# Sent on every response to a rate-limited request (app/api/ratelimit.py), when that limit is on.
RATE_HEADERS = {name: {"description": text, "schema": {"type": "integer", "minimum": 0}} for name, text in (
    ("X-RateLimit-Limit", "requests allowed per window"),
    ("X-RateLimit-Remaining", "requests left in this window"),
    ("X-RateLimit-Reset", "seconds until the window ends"))}


def _limited(responses, *statuses):
    """Add the rate-limit headers (and Retry-After on 429) to the given responses."""
    for status in statuses:
        headers = dict(RATE_HEADERS)
        if status == "429":
            headers["Retry-After"] = {"description": "seconds to wait (RATE_LIMITED)",
                                      "schema": {"type": "integer", "minimum": 0}}
        responses[status] = dict(responses[status], headers=headers)
    return responses

PATHS = {
    "/wireguard/connect": {"post": {
        "summary": "Establish a WireGuard tunnel: register the client key, get the tunnel config",
        "security": DEVICE, "requestBody": _body("Connect"),
        "responses": _limited({"200": _json("ConnectResponse"),
                               **_errors("UNAUTHORIZED", "CONFLICT", "POOL_EXHAUSTED", "EXIT_NOT_FOUND",
                                         "BRIDGE_UNAVAILABLE", "RATE_LIMITED", "DEVICE_LIMIT", "BRIDGE_LIMIT",
                                         "QUOTA_EXCEEDED", *HELPER)},
                              "200", "429")}},
    "/wireguard/disconnect": {"post": {
        "summary": "Remove the device's peer and free its address (idempotent)",
        "security": DEVICE, "requestBody": _body("Empty", required=False),
        "responses": {"200": _json("Message"), **_errors("UNAUTHORIZED", *HELPER)}}},
    "/wireguard/status": {"get": {
        "summary": "Server public key and peer count from the live interface",
        "security": INTERNAL,
        "responses": {"200": _json("StatusResponse"), **_errors("UNAUTHORIZED", "FORBIDDEN", *HELPER)}}},
    "/wireguard/add-peer": {"post": {
        "summary": "Add a peer provisioned by OrbNET",
        "description": "A scoped API key may add only one peer, of its own userUuid.",
        "security": INTERNAL, "requestBody": _body("AddPeer"),
        "responses": {"200": _json("Message"), **_errors("UNAUTHORIZED", "FORBIDDEN", "CONFLICT", *HELPER)}}},
    "/wireguard/remove-peer": {"post": {
        "summary": "Remove every peer of a user, or only its peer with publicKey (our extension)",
        "description": "A scoped API key may remove only peers of its own userUuid.",
        "security": INTERNAL, "requestBody": _body("RemovePeer"),
        "responses": {"200": _json("RemovePeerResponse"),
                      **_errors("UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", *HELPER)}}},
    "/wireguard/ws": {"get": {
        "summary": "WebSocket tunnel: one binary message per WireGuard datagram (docs/tunnel-protocol.md)",
        "security": DEVICE,
        "description": "A request without a WebSocket upgrade is 400 (after the token check: 401 first).",
        "responses": _limited({"101": {"description": "Switching Protocols"},
                               **_errors("UNAUTHORIZED", "TOO_MANY_SESSIONS", "RATE_LIMITED", "QUOTA_EXCEEDED")},
                              "101", "429")}},
    "/wireguard/tunnel": {"post": {
        "summary": "HTTP tunnel: datagrams up in the body, datagrams down in the response",
        "security": DEVICE,
        "parameters": [
            {"name": "X-Tunnel-Session", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}},
            {"name": "X-Tunnel-Wait", "in": "header", "required": False,
             "schema": {"type": "number", "minimum": 0}}],
        "requestBody": {"required": False, "content": {
            SINGLE_TYPE: {"schema": {"type": "string", "format": "binary"}},
            BATCH_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
        "responses": _limited({"200": {"description": "Datagrams from WireGuard", "content": {
            SINGLE_TYPE: {"schema": {"type": "string", "format": "binary"}},
            BATCH_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
            "204": {"description": "No datagram within the wait (single form)"},
            **_errors("UNAUTHORIZED", "UNSUPPORTED_MEDIA_TYPE", "TOO_MANY_SESSIONS", "RATE_LIMITED",
                      "QUOTA_EXCEEDED")},
            "200", "204", "429")}},
    "/wireguard/probe": {"post": {
        "summary": "A ticket and key for UDP probes: does UDP to this node work both ways? (docs/tunnel-protocol.md)",
        "security": DEVICE, "requestBody": _body("Empty", required=False),
        "responses": _limited({"200": _json("ProbeTicket"),
                               **_errors("UNAUTHORIZED", "NOT_FOUND", "RATE_LIMITED")}, "200", "429")}},
    "/wireguard/usage": {"get": {
        "summary": "A user's usage in the period, per device and in total, or a page of every user's",
        "description": "With userUuid: that user (an unknown user has usage zero). Without: users in order, at most "
                       "limit (1000) a page; nextCursor (null on the last page) asks for the next.",
        "security": INTERNAL,
        "parameters": [
            {"name": "userUuid", "in": "query", "required": False, "schema": dict(schemas._ID_DOC, type="string")},
            {"name": "cursor", "in": "query", "required": False,
             "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
        "responses": {"200": {"description": "The user's usage (userUuid), or a page of users", "content": {
            "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/UserUsageResponse"},
                                                      {"$ref": "#/components/schemas/UsagePage"}]}}}},
                      **_errors("UNAUTHORIZED", "FORBIDDEN")}}},
    "/wireguard/limits": {"post": {
        "summary": "Set or clear a user's speed tier and data quota on this node; resetUsage starts a new period",
        "description": "Answers the user's usage. A user under the quota again is back on the interface at once; "
                       "one at or over it is cut at once.",
        "security": INTERNAL, "requestBody": _body("Limits"),
        "responses": {"200": _json("UserUsageResponse"), **_errors("UNAUTHORIZED", "FORBIDDEN", *HELPER)}}},
    "/health": {"get": {
        "summary": "Health of the database, the helper, the interface and the DNS resolver",
        "description": "The status for anyone; the wireguard, database, helper and resolver blocks only with an "
                       "internal X-API-Key (a missing or wrong key is not an error here).",
        "responses": {"200": _json("Health", "healthy or degraded"),
                      "503": _json("Health", "unhealthy")}}},
    "/metrics": {"get": {
        "summary": "Prometheus metrics of every worker (text exposition format)",
        "security": INTERNAL,
        "responses": {"200": {"description": "Prometheus text format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      **_errors("UNAUTHORIZED", "FORBIDDEN")}}},
    "/openapi.json": {"get": {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3 document",
                              "content": {"application/json": {"schema": {"type": "object"}}}}}}},
}

SCHEMAS = {
    "Connect": schemas.ConnectSchema, "Empty": schemas.EmptySchema, "AddPeer": schemas.AddPeerSchema,
    "RemovePeer": schemas.RemovePeerSchema, "Error": schemas.ErrorSchema, "Message": schemas.MessageSchema,
    "RemovePeerResponse": schemas.RemovePeerResponseSchema, "ConnectResponse": schemas.ConnectResponseSchema,
    "StatusResponse": schemas.StatusResponseSchema, "Health": schemas.HealthSchema,
    "ProbeTicket": schemas.ProbeTicketSchema,
    "Limits": schemas.LimitsSchema, "UserUsageResponse": schemas.UserUsageResponseSchema,
    "UsagePage": schemas.UsagePageSchema,
}


def build_spec(config=None):
    """The document; with the app's config, limits that depend on settings are filled in."""
    paths = copy.deepcopy(PATHS)
    if config is not None:
        for parameter in paths["/wireguard/tunnel"]["post"]["parameters"]:
            if parameter["name"] == "X-Tunnel-Wait":
                parameter["schema"]["maximum"] = config["TUNNEL_HOLD"]
    spec = APISpec(title="OrbMesh WireGuard node", version="0.1.0", openapi_version="3.0.3",
                   plugins=[MarshmallowPlugin()],
                   info={"description": "WireGuard tunnels on an OrbMesh VPN server"})
    spec.components.security_scheme("deviceToken", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.security_scheme("apiKey", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    for name, schema in SCHEMAS.items():
        spec.components.schema(name, schema=schema)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document, built once per worker."""
    cache = current_app.extensions.setdefault("orbmesh_openapi", {})
    if "doc" not in cache:
        cache["doc"] = build_spec(current_app.config)
    return cache["doc"]
