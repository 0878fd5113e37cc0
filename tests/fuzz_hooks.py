"""Schemathesis additions shared by the in-process fuzz test and the CLI run on the real stack,
and report(): figures a fuzz run wants shown at the end of the test run.

The CLI loads this module with SCHEMATHESIS_HOOKS=tests.fuzz_hooks.
"""

import schemathesis
from schemathesis import checks
from schemathesis.core.parameters import ParameterLocation

BATCH_TYPE = "application/x-wireguard-batch"

# title -> {key: line}.  Figures are not assertions, so no test prints them:
# tests/conftest.py shows them in pytest's terminal summary, whichever tests ran.
_REPORTS = {}


def report(title, line, key=None):
    """Show `line` under `title` in the terminal summary; a later line with the same `key` replaces it."""
    _REPORTS.setdefault(title, {})[line if key is None else key] = line


def reports():
    """{title: [line, ...]}, in the order first reported."""
    return {title: list(lines.values()) for title, lines in _REPORTS.items()}


@schemathesis.serializer(BATCH_TYPE)
def _batch(ctx, value):
    """The HTTP tunnel's batch body is bytes, like application/octet-stream."""
    if isinstance(value, bytes):
        return value
    return getattr(value, "data", None) or str(value).encode()


@schemathesis.check
def no_server_fault(ctx, response, case):
    """No 5xx at all: with an empty exit registry an exitServerId is a 404, and
    the fake (or real) helper is up, so nothing here may answer 5xx."""
    if response.status_code >= 500:
        raise AssertionError("server fault: %d %s" % (response.status_code, response.content[:300]))


def undeclared_header_only(case):
    """Whether the only "invalid" part of a negative case is a header the operation does not declare.

    HTTP servers must ignore headers they do not know (proxies add them), so
    such a request is rightly served; negative_data_rejection would call it
    a failure.
    """
    meta = case.meta
    if meta is None or not meta.is_negative_at(ParameterLocation.HEADER):
        return False
    if any(meta.is_negative_at(location) for location in ParameterLocation if location != ParameterLocation.HEADER):
        return False
    declared = {p["name"].lower() for p in case.operation.definition.raw.get("parameters", [])
                if p.get("in") == "header"}
    return bool({name.lower() for name in case.headers or {}} - declared)


@schemathesis.check
def invalid_data_rejected(ctx, response, case):
    """negative_data_rejection, except for cases whose only fault is an undeclared header."""
    if undeclared_header_only(case):
        return None
    return checks.negative_data_rejection(ctx, response, case)
