"""Schemathesis, driven by /openapi.json, against the WSGI app with the fake helper.

Every operation, with each kind of credentials: a valid device token, a
valid API key, both, wrong ones and none.  Checks: no 5xx (but the documented 501 for bridge mode), status codes,
content types, headers and bodies as documented, invalid data refused, auth
not ignored.  ORBMESH_FUZZ_EXAMPLES sets the examples per operation and
credential kind (CI default below); scripts/fuzz runs a longer one.
"""
import atexit
import os
import shutil
import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from app import create_app
from app.api.auth import mint_device_token
from tests.conftest import API_KEYS, SECRET, FakeHelper
from tests.fuzz_hooks import invalid_data_rejected, no_server_fault, report

EXAMPLES = int(os.environ.get("ORBMESH_FUZZ_EXAMPLES", "25"))

_dir = tempfile.mkdtemp(prefix="omfuzz-")
atexit.register(shutil.rmtree, _dir, True)
APP = create_app({
    "DB_PATH": os.path.join(_dir, "fuzz.db"), "HELPER_SOCKET": os.path.join(_dir, "none.sock"),
    "JWT_SECRET": SECRET, "API_KEYS": API_KEYS, "RECONCILE_CHECK_INTERVAL": 0, "PUBLIC_HOST": "198.51.100.1",
    # Short long-polls and roomy limits, so examples reach the views rather than the limits
    # (the limits have their own tests); a port nothing listens on for the tunnel's UDP.
    "TUNNEL_HOLD": 0.05, "TUNNEL_SESSION_IDLE": 1, "TUNNEL_MAX_SESSIONS": 1000, "CONNECT_RATE_LIMIT": 100000,
    "TUNNEL_RATE_LIMIT": 100000, "LISTEN_PORT": 9, "POOL": "10.77.0.0/16",
    # The probe echo a ticket starts: on loopback only, not every address of the host.
    "PROBE_HOST": "127.0.0.1",
})
APP.extensions["orbmesh_helper"] = FakeHelper()
REQUESTS = {"count": 0}  # every request the app served, check probes included
CASES = {"count": 0}
_serve = APP.wsgi_app


def _counting(environ, start_response):
    REQUESTS["count"] += 1
    # Here rather than in the test: hypothesis's derandomize seeds the examples
    # from the test function's source, so editing it changes what is fuzzed.
    report("fuzz runs", "schemathesis (WSGI, fake helper): %d requests served for %d generated cases "
           "(%d examples per operation and credential kind)" % (REQUESTS["count"], CASES["count"], EXAMPLES),
           key="api")
    return _serve(environ, start_response)


APP.wsgi_app = _counting
TOKEN = mint_device_token(APP.config, "fuzz-user", "fuzz-device", ttl=86400)
WRONG_TOKEN = mint_device_token(dict(APP.config, JWT_SECRET="another-secret-" + "z" * 40), "fuzz-user", "d")

CREDENTIALS = {
    "device-token": {"Authorization": "Bearer " + TOKEN},
    "api-key": {"X-API-Key": API_KEYS[1]},
    "both": {"Authorization": "Bearer " + TOKEN, "X-API-Key": API_KEYS[0]},
    "wrong": {"Authorization": "Bearer " + WRONG_TOKEN, "X-API-Key": "wrong-key-0123456789abcdef"},
    "none": {},
}
CHECKS = [no_server_fault, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, invalid_data_rejected,
          checks.ignored_auth, checks.missing_required_header, checks.unsupported_method]


schema = schemathesis.openapi.from_wsgi("/openapi.json", APP)


@pytest.fixture(autouse=True, scope="module")
def _close_tunnel_sessions():
    """Close the run's HTTP tunnel sessions at the end, not in this app's background reaper.

    The session gauge is process-wide: a reaper closing them a second later
    changed it under test_metrics' before/after scrapes.
    """
    yield
    APP.extensions["orbmesh_http_sessions"].reap(now=float("inf"))


@schema.parametrize()
@pytest.mark.parametrize("credentials", sorted(CREDENTIALS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case, credentials):
    CASES["count"] += 1
    # Passed as explicit headers, so ignored_auth also re-sends without them and with invalid ones.
    case.call_and_validate(headers=CREDENTIALS[credentials], checks=CHECKS)
