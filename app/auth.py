"""Device tokens (JWT) for client endpoints, API keys for OrbNET's.

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

from .errors import ApiError

DEVICE_TOKEN_TYPE = "device"
BAD_TOKEN = "Invalid or expired device token"
BAD_KEY = "Invalid or missing API key"
MAX_TOKEN_CHARS = 8192
_ID = re.compile(r"\A[A-Za-z0-9_.:@-]{1,128}\Z")


def _verification_key(config):
    if config["JWT_ALGORITHM"].startswith("HS"):
        return config["JWT_SECRET"]
    return config["JWT_PUBLIC_KEY"]


def verify_device_token(token, config):
    """Return (user_id, device_id) or raise ApiError UNAUTHORIZED."""
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
    return user, device


def mint_device_token(config, user, device, ttl=3600, signing_key=None):
    """A device token as OrbNET would issue it (for local use and tests)."""
    now = int(time.time())
    claims = {"iss": config["JWT_ISSUER"], "sub": user, "device_id": device,
              "token_type": DEVICE_TOKEN_TYPE, "iat": now, "exp": now + int(ttl)}
    if config["JWT_AUDIENCE"]:
        claims["aud"] = config["JWT_AUDIENCE"]
    key = signing_key if signing_key is not None else config["JWT_SECRET"]
    return jwt.encode(claims, key, algorithm=config["JWT_ALGORITHM"])


def bearer_token():
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


def device_token_required(view):
    """Put (user_id, device_id) from a valid device token on g.device."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        g.device = verify_device_token(bearer_token(), current_app.config)
        return view(*args, **kwargs)
    return wrapped


def api_key_valid(given, keys):
    """Compare against every key, in constant time, without stopping early."""
    # Digests first, so neither the length nor the content of a key leaks.
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_digest, hashlib.sha256(key.encode()).digest())
    return found and bool(given)


def has_api_key():
    """Whether the request carries one of the internal API keys."""
    return api_key_valid(request.headers.get("X-API-Key", ""), current_app.config["API_KEYS"])


def api_key_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not api_key_valid(request.headers.get("X-API-Key", ""), current_app.config["API_KEYS"]):
            raise ApiError("UNAUTHORIZED", BAD_KEY)
        return view(*args, **kwargs)
    return wrapped
