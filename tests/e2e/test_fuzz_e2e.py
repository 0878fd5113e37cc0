"""Schemathesis against the real stack (gunicorn gevent workers + helper + wireguard-go), then a secret scan.

The schemathesis CLI runs in the client namespace against
http://192.0.2.1:8080/openapi.json: once with valid credentials (a device
token and an API key on every request; its ignored_auth check re-sends
without and with invalid ones) and once with wrong ones.  Afterwards every
log line of the run (app, gunicorn access log, helper) is searched for every
secret the run used.  ORBMESH_FUZZ_EXAMPLES sets the examples per operation
(CI default below); scripts/fuzz runs a longer one.
"""
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import jwt
import pytest

from tests.fuzz_hooks import report

from .stack import API_PORT, CLIENT_ADDR, SERVER_ADDR, VENV_BIN
from .wgclient import keypair

EXAMPLES = int(os.environ.get("ORBMESH_FUZZ_EXAMPLES", "50"))
ROOT = Path(__file__).parents[2]
CHECKS = ("no_server_fault,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,invalid_data_rejected,ignored_auth,missing_required_header,"
          "unsupported_method")


@pytest.fixture
def stack_env():
    # Roomy limits and a short long-poll, so examples reach the views (the limits have their own tests).
    return {"ORBMESH_CONNECT_RATE_LIMIT": "100000", "ORBMESH_TUNNEL_RATE_LIMIT": "100000",
            "ORBMESH_TUNNEL_MAX_SESSIONS": "1000", "ORBMESH_TUNNEL_HOLD": "0.2", "ORBMESH_TUNNEL_SESSION_IDLE": "2",
            # The server namespace's own address plays the proxy (nginx) for the forwarded-header test.
            "ORBMESH_TRUSTED_PROXIES": SERVER_ADDR}


def fuzz(stack, name, headers, tmp_path):
    """One schemathesis CLI run from the client namespace; returns (exit code, output, requests served)."""
    served_before = len(stack.access_log.read_text().splitlines()) if stack.access_log.exists() else 0
    report_dir = tmp_path / ("report-" + name)
    argv = [VENV_BIN / "schemathesis", "run", "http://%s:%d/openapi.json" % (SERVER_ADDR, API_PORT),
            "--checks", CHECKS, "--max-examples", str(EXAMPLES), "--seed", "7", "--workers", "2",
            "--suppress-health-check", "all", "--request-timeout", "30", "--no-color",
            "--report", "junit", "--report-dir", report_dir]
    for header, value in headers.items():
        argv += ["-H", "%s: %s" % (header, value)]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.fuzz_hooks", PYTHONPATH=str(ROOT), NO_COLOR="1")
    out = stack.client.run(*argv, check=False, timeout=1200, env=env)
    served = len(stack.access_log.read_text().splitlines()) - served_before
    # The stateful phase (chains of operations, since the document links usage and limits) reports
    # itself as one more test case; the set compared is the operations'.
    tested = {case.get("name") for xml in report_dir.glob("*.xml") for case in ET.parse(xml).iter("testcase")
              if case.get("name") != "Stateful tests"}
    return out.returncode, out.stdout + out.stderr, served, tested


def test_schemathesis_on_the_real_stack_then_no_secret_in_any_log(stack, tmp_path, capsys):
    token = stack.token("fuzz-user", "fuzz-device")
    wrong_token = jwt.encode(jwt.decode(token, options={"verify_signature": False}), "w" * 48, algorithm="HS256")
    wrong_key = "wrong-api-key-" + stack.api_key[::-1]
    client_private, client_public = keypair()
    status, body = stack.connect("fuzz-user", "real-device", client_public)
    assert status == 200, body

    status, _, raw = stack.request("GET", "/openapi.json")
    documented = {"%s %s" % (method.upper(), path) for path, operations in json.loads(raw)["paths"].items()
                  for method in operations if path != "/openapi.json"}
    # 9, POST /wireguard/probe (issue 24), GET /wireguard/usage and POST /wireguard/limits (issue 25)
    assert status == 200 and len(documented) == 12
    figures = {}
    for name, headers in (("valid", {"Authorization": "Bearer " + token, "X-API-Key": stack.api_key}),
                          ("wrong", {"Authorization": "Bearer " + wrong_token, "X-API-Key": wrong_key})):
        code, output, served, tested = fuzz(stack, name, headers, tmp_path)
        assert code == 0, output[-6000:]
        # Every operation of the document (schemathesis leaves out the document's own URL).
        assert tested == documented, output[-3000:]
        assert "No issues found" in output or "passed" in output, output[-3000:]
        figures[name] = served
    # The helper and the interface came through: the real peer is still there and the API still serves it.
    status, body = stack.connect("fuzz-user", "real-device", client_public)
    assert status == 200 and body["publicKey"] == client_public
    assert client_public in stack.wg_peers()
    report("schemathesis (real stack)", "%d examples per operation: %d requests with valid credentials, "
           "%d with wrong ones" % (EXAMPLES, figures["valid"], figures["wrong"]))

    stack.stop_app()
    stack.stop_helper()
    server_private = (stack.tmp / "helper-state" / "server.key").read_text().strip()
    secrets = {"jwt secret": stack.secret, "api key": stack.api_key, "device token": token,
               "token signature": token.rsplit(".", 1)[1], "wrong token": wrong_token,
               "wrong token signature": wrong_token.rsplit(".", 1)[1], "wrong api key": wrong_key,
               "server private key": server_private, "client private key": client_private}
    logs = {path.name: path.read_text() for path in (stack.app_log, stack.helper_log, stack.access_log)}
    assert all(logs.values()) and "app.access" in logs["app.log"]
    leaks = [(secret, log) for secret, value in secrets.items() for log, text in logs.items() if value in text]
    assert leaks == []


def test_forwarded_address_is_believed_only_from_the_trusted_proxy(stack):
    """The access log's client: X-Real-IP from the proxy, the socket peer from anyone else."""
    url = "http://%s:%d/health" % (SERVER_ADDR, API_PORT)
    spoof = {"X-Real-IP": "203.0.113.66", "X-Forwarded-For": "203.0.113.67", "X-Request-ID": "from-client"}
    forwarded = {"X-Real-IP": "198.51.100.77", "X-Request-ID": "from-proxy"}
    assert stack.client.http("GET", url, headers=spoof)[0] == 200
    assert stack.server.http("GET", url, headers=forwarded)[0] == 200
    stack.stop_app()
    events = [json.loads(line) for line in stack.app_log.read_text().splitlines() if line.startswith("{")]
    clients = {e["request_id"]: e["client"] for e in events if e.get("logger") == "app.access"
               and e.get("request_id") in ("from-client", "from-proxy")}
    assert clients == {"from-client": CLIENT_ADDR, "from-proxy": "198.51.100.77"}


def test_oversized_headers_are_refused_and_the_service_keeps_serving(stack):
    """gunicorn refuses them before the app (400, its own plain body; nginx does the same in front)."""
    token = stack.token("big-headers", "dev")
    too_long = {"Authorization": "Bearer " + token + "A" * 20000}
    too_many = dict({"X-Filler-%03d" % n: "x" for n in range(150)}, Authorization="Bearer " + token)
    for headers in (too_long, too_many):
        status, _, _ = stack.request("POST", "/wireguard/connect", {"publicKey": keypair()[1]}, headers)
        assert 400 <= status < 500
    assert stack.db_peers() == {}
    status, body = stack.connect("big-headers", "dev", keypair()[1])
    assert status == 200, body


def test_a_long_query_gets_the_apis_own_400(stack):
    """A request line up to 8 KB (what nginx's default buffers pass) reaches the app: a bad query answers
    400 in the envelope, not gunicorn's HTML 414 (the fuzzer found one at 5,475 bytes)."""
    status, _, raw = stack.request("GET", "/wireguard/usage?cursor=" + "%C3%89" * 900 + "&limit=x",
                                   headers={"X-API-Key": stack.api_key})
    body = json.loads(raw)
    assert status == 400 and body["success"] is False and body["error"]["code"] == "VALIDATION_ERROR", raw[:300]
