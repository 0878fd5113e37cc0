"""The domain's errors: what a request could not have, in the domain's words.

Raised by peers/, bridge/, tunnel/, ops/ and helper.py, which know nothing
of HTTP.  Each names its `code` (docs/api.md's error codes: a name, not a
status); the edge (app/api/errors.py) turns any Failure into the one
envelope with that code's HTTP status.
"""


class Failure(Exception):
    """A request refused on purpose: `message` for the client, `details` (a dict) or None."""

    code = "INTERNAL_ERROR"

    def __init__(self, message, details=None):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(Failure):
    """Input that passed its schema but not the domain (a device token's plan, the server's own key)."""
    code = "VALIDATION_ERROR"

    @classmethod
    def field(cls, name, message):
        return cls("Request validation failed", {"fields": {name: [message]}})


class Conflict(Failure):
    code = "CONFLICT"


class DeviceLimit(Failure):
    code = "DEVICE_LIMIT"


class PoolExhausted(Failure):
    code = "POOL_EXHAUSTED"


class QuotaExceeded(Failure):
    code = "QUOTA_EXCEEDED"


class ExitNotFound(Failure):
    code = "EXIT_NOT_FOUND"


class BridgeUnavailable(Failure):
    code = "BRIDGE_UNAVAILABLE"


class BridgeLimit(Failure):
    code = "BRIDGE_LIMIT"


class TooManySessions(Failure):
    code = "TOO_MANY_SESSIONS"


class ServerStopping(Failure):
    code = "SERVER_STOPPING"


class HelperUnavailable(Failure):
    code = "HELPER_UNAVAILABLE"

    def __init__(self, message="WireGuard helper is unavailable"):
        super().__init__(message)


class HelperFailed(Failure):
    """The helper refused or its command failed: its error code, command, exit code and field, no more."""
    code = "HELPER_ERROR"

    def __init__(self, error):
        details = {"helperCode": error.get("code")}
        if isinstance(error.get("details"), dict):
            details.update({k: v for k, v in error["details"].items() if k in ("command", "exit_code", "field")})
        super().__init__("WireGuard helper failed: %s" % error.get("message", "unknown error"), details)
        self.helper_code = error.get("code")
