"""The one error envelope and every error handler.

Every failure leaves the app as
``{"success": false, "error": {"code": ..., "message": ..., "details"?: ...}}``.
The domain raises its own errors (app/failures.py), which carry a code and
no HTTP; here each code gets its status.
"""
import logging
import sqlite3

from flask import jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from ..failures import Failure

log = logging.getLogger(__name__)

# code -> HTTP status; the README lists the same table.
CODES = {
    "VALIDATION_ERROR": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "EXIT_NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "CONFLICT": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "TOO_MANY_SESSIONS": 429,
    "RATE_LIMITED": 429,
    "BRIDGE_LIMIT": 429,
    "DEVICE_LIMIT": 403,
    "QUOTA_EXCEEDED": 403,
    "NOT_IMPLEMENTED": 501,
    "INTERNAL_ERROR": 500,
    "HELPER_ERROR": 502,
    "BRIDGE_UNAVAILABLE": 502,
    "POOL_EXHAUSTED": 503,
    "HELPER_UNAVAILABLE": 503,
    "DATABASE_UNAVAILABLE": 503,
    "SERVER_STOPPING": 503,
}

_HTTP_CODES = {
    400: "VALIDATION_ERROR", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


class ApiError(Failure):
    """An error the edge itself reports on purpose (a header, a token, a rate limit), with its code."""

    def __init__(self, code, message, details=None):
        if code not in CODES:
            raise ValueError("not an error code: %s" % code)
        super().__init__(message, details)
        self.code = code


def envelope(code, message, details=None):
    error = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"success": False, "error": error}


def error_response(code, message, details=None, status=None):
    response = jsonify(envelope(code, message, details))
    response.status_code = status or CODES[code]
    return response


def _failure(exc):
    return error_response(exc.code, exc.message, exc.details)


def _validation_error(exc):
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    return error_response("VALIDATION_ERROR", "Request validation failed", {"fields": messages})


def _http_error(exc):
    code = _HTTP_CODES.get(exc.code, "INTERNAL_ERROR" if exc.code >= 500 else "VALIDATION_ERROR")
    response = error_response(code, exc.description or exc.name, status=exc.code)
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _database_error(exc):
    # Locked past the busy timeout, disk full, read-only: the transaction was
    # rolled back, so the client may simply retry.
    log.error("database error: %s", exc)
    return error_response("DATABASE_UNAVAILABLE", "The database is busy or unavailable; retry shortly")


def _unexpected(exc):
    log.exception("unhandled error: %s", type(exc).__name__)
    return error_response("INTERNAL_ERROR", "Internal server error")


def init_app(app):
    app.register_error_handler(Failure, _failure)
    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(sqlite3.Error, _database_error)
    app.register_error_handler(Exception, _unexpected)
