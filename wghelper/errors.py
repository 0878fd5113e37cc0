"""Every exception of the helper and of its shared contract, in one place.

Standard library only: the app imports this through the contract modules
(protocol, validate, settings).
"""


class ConfigError(Exception):
    """A setting is malformed; the message names the variable."""


class Invalid(ValueError):
    """An argument from the app failed validation (INVALID_ARGUMENT)."""

    def __init__(self, field, message):
        super().__init__("%s: %s" % (field, message))
        self.field = field
        self.message = message


class HelperError(Exception):
    """A refusal the helper reports with one of protocol's error codes."""

    def __init__(self, code, message, details=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class ProtocolError(HelperError):
    """A frame that cannot be decoded; carries the reply's error code."""


class CommandFailed(Exception):
    """wg, ip, nft, sysctl or wireguard-go exited non-zero, timed out or could not start."""

    def __init__(self, command, exit_code, stderr):
        super().__init__("%s failed (exit %s): %s" % (command, exit_code, stderr))
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr or ""

    def details(self):
        return {"command": self.command, "exit_code": self.exit_code, "stderr": self.stderr}
