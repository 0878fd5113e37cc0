"""Device tokens (JWT) for client endpoints, API keys for OrbNET's.

An internal API key (API_KEYS) opens every internal endpoint.  A scoped key
(SCOPED_API_KEYS, KEY=userUuid) opens only add-peer and remove-peer, and only
for its own userUuid: what an entry in bridge mode needs on an exit, so an
entry that leaks its key cannot read or remove anyone else.

A device token is a JWT signed by OrbNET with claims:
``iss`` (= JWT_ISSUER), ``sub`` (user id), ``device_id``, ``token_type``
(= "device"), ``exp``; ``iat``, ``nbf`` and ``aud`` are checked when present
or configured.  A user JWT signed with the same key lacks the device
claims and is refused like any bad token.
"""
import functools
import hashlib
import hmac
import re
import time

import jwt
from flask import current_app, g, request

from wghelper.validate import IDENTIFIER_RE

from .errors import ApiError

DEVICE_TOKEN_TYPE = "device"
BAD_TOKEN = "Invalid or expired device token"
BAD_KEY = "Invalid or missing API key"
SCOPED_ONLY = "This API key may only add and remove the peers of its own userUuid"
MAX_TOKEN_CHARS = 8192
_ID = IDENTIFIER_RE


def _verification_key(config):
    if config["JWT_ALGORITHM"].startswith("HS"):
        return config["JWT_SECRET"]
    return config["JWT_PUBLIC_KEY"]


def verify_device_token(token, config):
    """Return (user_id, device_id) or raise ApiError UNAUTHORIZED."""
    return _verify(token, config)[0]


# Claims a token may carry for the device's plan (app/peers/usage.py checks them); the API's limits win.
PLAN_CLAIMS = ("rate_mbps", "quota_bytes")


def _verify(token, config):
    """((user_id, device_id), exp, plan) of a token PyJWT accepts, or ApiError UNAUTHORIZED; plan: the
    PLAN_CLAIMS it carries, as they are."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise ApiError("UNAUTHORIZED", BAD_TOKEN)
    options = {"require": ["exp", "iss", "sub"]}
    audience = config["JWT_AUDIENCE"] or None
    if audience:
        options["require"].append("aud")
    try:
        claims = jwt.decode(
            token, _verification_key(config), algorithms=[config["JWT_ALGORITHM"]],
            issuer=config["JWT_ISSUER"], audience=audience, leeway=config["JWT_LEEWAY"],
            options=options)
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise ApiError("UNAUTHORIZED", BAD_TOKEN) from None
    user, device = claims.get("sub"), claims.get("device_id")
    if (claims.get("token_type") != DEVICE_TOKEN_TYPE or not isinstance(user, str)
            or not isinstance(device, str) or not _ID.match(user) or not _ID.match(device)):
        raise ApiError("UNAUTHORIZED", BAD_TOKEN)
    return (user, device), claims["exp"], {k: claims[k] for k in PLAN_CLAIMS if k in claims}


class VerifiedTokens:
    """Device tokens this process has verified, until they expire.

    An HTTP tunnel sends its token with every request, hundreds a second in
    a bulk transfer, where PyJWT's decode was 6% of the worker's CPU
    (docs/benchmarks.md).  Keyed by the token's SHA-256, so no token is
    kept; a hit is checked against its own exp (with the leeway PyJWT
    allows) every time; a full cache starts over rather than grow.
    """

    SIZE = 4096

    def __init__(self):
        self._entries = {}  # digest -> (exp, (user, device), plan)

    def verify(self, token, config):
        return self.verify_with_plan(token, config)[0]

    def verify_with_plan(self, token, config):
        """((user, device), plan claims) of a valid token."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise ApiError("UNAUTHORIZED", BAD_TOKEN)  # before hashing 8 KiB and more for nothing
        key = _digest(token)
        hit = self._entries.get(key)
        if hit is not None and hit[0] > time.time() - config["JWT_LEEWAY"]:
            return hit[1], hit[2]
        device, exp, plan = _verify(token, config)
        if len(self._entries) >= self.SIZE:
            self._entries = {}
        self._entries[key] = (exp, device, plan)
        return device, plan


def authenticate_device():
    """(user_id, device_id) of the request's device token, or ApiError UNAUTHORIZED; its plan claims on
    g.device_plan."""
    device, g.device_plan = current_app.extensions["orbmesh_tokens"].verify_with_plan(bearer_token(),
                                                                                      current_app.config)
    return device


def init_app(app):
    app.extensions["orbmesh_tokens"] = VerifiedTokens()


def mint_device_token(config, user, device, ttl=3600, signing_key=None, plan=None):
    """A device token as OrbNET would issue it (for local use and tests); `plan`: PLAN_CLAIMS to carry."""
    now = int(time.time())
    claims = {"iss": config["JWT_ISSUER"], "sub": user, "device_id": device,
              "token_type": DEVICE_TOKEN_TYPE, "iat": now, "exp": now + int(ttl), **(plan or {})}
    if config["JWT_AUDIENCE"]:
        claims["aud"] = config["JWT_AUDIENCE"]
    key = signing_key if signing_key is not None else config["JWT_SECRET"]
    return jwt.encode(claims, key, algorithm=config["JWT_ALGORITHM"])


# The one spelling of a device token in Authorization: "Bearer" in any case,
# a space, then the token between optional blanks.  nginx picks the instance
# by the token this pattern finds (deploy/nginx/orbmesh.conf, the same
# pattern, checked by tests/deploy/test_files.py), so every spelling accepted
# here lands on one instance.  A JWT is base64url without padding, but PyJWT
# also verifies "T=" when T's signature leaves room for one: group 2 takes
# trailing "=" apart, nginx hashes on group 1 alone (so "T=" meets T's
# instance) and bearer_token() refuses the padded spelling.
BEARER_PATTERN = r"^bearer [ \t]*([^ \t=]+)(=*)[ \t]*$"
_BEARER = re.compile(BEARER_PATTERN, re.IGNORECASE | re.ASCII)


def bearer_token():
    """The device token of the request, or "" (refused) when absent, odd or padded with "="."""
    match = _BEARER.match(request.headers.get("Authorization", ""))
    return match.group(1) if match and not match.group(2) else ""


def device_token_required(view):
    """Put (user_id, device_id) from a valid device token on g.device."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        g.device = authenticate_device()
        return view(*args, **kwargs)
    return wrapped


def _digest(text):
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def api_key_valid(given, keys):
    """Compare against every key, in constant time, without stopping early."""
    # Digests first, so neither the length nor the content of a key leaks.
    given_digest = _digest(given)
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_digest, _digest(key))
    return found and bool(given)


def _scope_of(given, scoped):
    """The userUuid a scoped key is limited to, or None; every scoped key is compared."""
    given_digest = _digest(given)
    scope = None
    for key, user in scoped.items():
        if hmac.compare_digest(given_digest, _digest(key)):
            scope = user
    return scope if given else None


def has_api_key():
    """Whether the request carries one of the internal (full) API keys."""
    return api_key_valid(request.headers.get("X-API-Key", ""), current_app.config["API_KEYS"])


def _key_scope(allow_scoped):
    """None for a full key; the userUuid of a scoped key where `allow_scoped`; else 401 or 403."""
    if has_api_key():
        return None
    scope = _scope_of(request.headers.get("X-API-Key", ""), current_app.config["SCOPED_API_KEYS"])
    if scope is None:
        raise ApiError("UNAUTHORIZED", BAD_KEY)
    if not allow_scoped:
        raise ApiError("FORBIDDEN", SCOPED_ONLY)
    return scope


def api_key_required(view):
    """A full internal API key; a scoped key is 403 here."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        _key_scope(allow_scoped=False)
        return view(*args, **kwargs)
    return wrapped


def peer_key_required(view):
    """A full key, or a scoped key (g.key_scope: its userUuid, for check_scope)."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        g.key_scope = _key_scope(allow_scoped=True)
        return view(*args, **kwargs)
    return wrapped


def check_scope(user_id):
    """FORBIDDEN when a scoped key names a userUuid other than its own."""
    scope = g.get("key_scope")
    if scope is not None and scope != user_id:
        raise ApiError("FORBIDDEN", SCOPED_ONLY)
