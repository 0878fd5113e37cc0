"""Schemathesis additions shared by the in-process fuzz test and the CLI run on the real stack.

The CLI loads this module with SCHEMATHESIS_HOOKS=tests.fuzz_hooks.
"""
import json

import schemathesis

BATCH_TYPE = "application/x-wireguard-batch"


@schemathesis.serializer(BATCH_TYPE)
def _batch(ctx, value):
    """The HTTP tunnel's batch body is bytes, like application/octet-stream."""
    if isinstance(value, bytes):
        return value
    return getattr(value, "data", None) or str(value).encode()


@schemathesis.check
def no_server_fault(ctx, response, case):
    """No 5xx, except the documented 501 NOT_IMPLEMENTED for exitServerId (bridge mode).

    Used instead of not_a_server_error, which cannot tell a documented 501
    from a crash.
    """
    if response.status_code < 500:
        return None
    if response.status_code == 501:
        try:
            if json.loads(response.content)["error"]["code"] == "NOT_IMPLEMENTED":
                return None
        except (ValueError, KeyError, TypeError):
            pass
    raise AssertionError("server fault: %d %s" % (response.status_code, response.content[:300]))
