"""Logs: JSON lines, request ids, the access event, client address, no secrets."""
import io
import json
import logging
import os
import re

import jwt
import pytest

from app import create_app
from app.config import ConfigError
from app.ops import logs
from tests.conftest import API_KEYS, SECRET, FakeHelper, make_key


def _our_handler():
    handlers = [h for h in logging.getLogger().handlers if getattr(h, "orbmesh", False)]
    assert len(handlers) == 1  # create_app replaces its handler, never stacks them
    return handlers[0]


@pytest.fixture
def captured(app):
    """The lines the app's own log handler writes."""
    buffer = io.StringIO()
    handler = _our_handler()
    handler.setStream(buffer)
    yield lambda: [line for line in buffer.getvalue().splitlines() if line]
    handler.setStream(None)


def _access(lines, request_id):
    events = [json.loads(line) for line in lines]
    return [e for e in events if e["logger"] == "app.access" and e.get("request_id") == request_id]


def test_no_secrets_in_any_line_and_every_line_has_the_request_id(client, token, captured, fake_helper):
    device_token = token("user-7", "device-7")
    forged = jwt.encode({"iss": "orbnet", "sub": "user-7", "device_id": "device-7", "token_type": "device",
                         "exp": 4102444800}, "another-secret-" + "y" * 32, algorithm="HS256")
    sent = {}

    def call(request_id, method, path, **kwargs):
        headers = dict(kwargs.pop("headers", {}), **{"X-Request-ID": request_id})
        response = client.open(path, method=method, headers=headers, **kwargs)
        sent[request_id] = response
        assert response.headers["X-Request-ID"] == request_id
        return response

    assert call("connect-1", "POST", "/wireguard/connect", json={"publicKey": make_key(1)},
                headers={"Authorization": "Bearer " + device_token}).status_code == 200
    assert call("status-1", "GET", "/wireguard/status", headers={"X-API-Key": API_KEYS[0]}).status_code == 200
    assert call("bad.token_1", "POST", "/wireguard/connect", json={"publicKey": make_key(2)},
                headers={"Authorization": "Bearer " + forged}).status_code == 401
    assert call("bad-key-1", "GET", "/wireguard/status", headers={"X-API-Key": API_KEYS[0] + "x"}).status_code == 401
    # A token in the query string does not reach the log either: paths are logged without it.
    assert call("query-1", "GET", "/health?token=" + device_token + "&key=" + API_KEYS[1]).status_code == 200
    fake_helper.fail = "failed"  # a warning logged from deep inside a request
    assert call("helper-1", "POST", "/wireguard/disconnect",
                headers={"Authorization": "Bearer " + device_token}).status_code == 502

    lines = captured()
    assert lines
    secrets = [device_token, device_token.split(".")[2], forged, forged.split(".")[2], SECRET, *API_KEYS,
               API_KEYS[0] + "x"]
    for line in lines:
        entry = json.loads(line)
        assert entry["request_id"] in sent, line
        assert {"time", "level", "logger", "message"} <= set(entry)
        for secret in secrets:
            assert secret not in line
    for request_id, response in sent.items():
        (event,) = _access(lines, request_id)
        assert event["status"] == response.status_code and event["client"] == "127.0.0.1"
        assert "?" not in event["path"] and event["duration_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", json.loads(lines[0])["time"])


def test_request_id_echoed_or_generated_on_every_response(client, auth, monkeypatch):
    assert client.get("/health", headers={"X-Request-ID": "abc.DEF_123-x"}).headers["X-Request-ID"] == "abc.DEF_123-x"
    for bad in ("", "has space", "x" * 65, "semi;colon", "ünïcode", "a/b"):
        response = client.get("/health", headers={"X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"]), bad
    first = client.get("/health").headers["X-Request-ID"]
    second = client.get("/health").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second
    # Errors too: 404, 405, 401 (from a blueprint's before_request), 413, 500.
    monkeypatch.setattr("app.peers.lifecycle.connect_device", lambda *a, **k: 1 / 0)
    for method, path, kwargs, status in [
            ("GET", "/nowhere", {}, 404), ("GET", "/wireguard/connect", {}, 405),
            ("POST", "/wireguard/tunnel", {}, 401), ("POST", "/wireguard/connect", {"data": b"x" * 70000, "headers": auth()}, 413),
            ("POST", "/wireguard/connect", {"json": {"publicKey": make_key(1)}, "headers": auth()}, 500)]:
        headers = dict(kwargs.pop("headers", {}), **{"X-Request-ID": "err-%d" % status})
        response = client.open(path, method=method, headers=headers, **kwargs)
        assert response.status_code == status
        assert response.headers["X-Request-ID"] == "err-%d" % status


def test_unhandled_error_is_logged_as_json_with_traceback(client, auth, captured, monkeypatch):
    monkeypatch.setattr("app.peers.lifecycle.connect_device", lambda *a, **k: 1 / 0)
    client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                headers=dict(auth(), **{"X-Request-ID": "boom"}))
    entries = [json.loads(line) for line in captured()]
    (error,) = [e for e in entries if e["level"] == "ERROR"]
    assert error["request_id"] == "boom" and "ZeroDivisionError" in error["exception"]


@pytest.mark.parametrize("peer,real_ip,expected", [
    ("203.0.113.9", "198.51.100.7", "203.0.113.9"),   # untrusted peer: header ignored
    ("127.0.0.1", "198.51.100.7", "198.51.100.7"),    # trusted proxy: header used
    ("::1", "2001:db8::7", "2001:db8::7"),
    ("::ffff:127.0.0.1", "198.51.100.7", "198.51.100.7"),
    ("127.0.0.1", "not-an-ip", "127.0.0.1"),          # malformed header from a proxy: the peer
    ("127.0.0.1", None, "127.0.0.1"),
])
def test_client_address_trusts_x_real_ip_only_from_proxies(client, captured, peer, real_ip, expected):
    headers = {"X-Request-ID": "addr"}
    if real_ip is not None:
        headers["X-Real-IP"] = real_ip
    client.get("/health", headers=headers, environ_base={"REMOTE_ADDR": peer})
    (event,) = _access(captured(), "addr")
    assert event["client"] == expected


def test_trusted_proxies_setting_and_unix_peers(settings, monkeypatch):
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    app = create_app(dict(settings, TRUSTED_PROXIES="10.0.0.5,unix"))
    app.extensions["orbmesh_helper"] = FakeHelper()
    for peer, expected in (("10.0.0.5", "198.51.100.7"), ("127.0.0.1", "127.0.0.1"), ("", "198.51.100.7")):
        with app.test_request_context("/health", headers={"X-Real-IP": "198.51.100.7"},
                                      environ_base={"REMOTE_ADDR": peer}):
            assert logs.client_address() == expected


def test_bad_log_settings_are_refused(settings):
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        create_app(dict(settings, LOG_FORMAT="xml"))
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        create_app(dict(settings, TRUSTED_PROXIES="nginx.local"))


def test_text_format(settings, monkeypatch):
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    app = create_app(dict(settings, LOG_FORMAT="text"))
    app.extensions["orbmesh_helper"] = FakeHelper()
    buffer = io.StringIO()
    _our_handler().setStream(buffer)
    try:
        app.test_client().get("/health?x=1", headers={"X-Request-ID": "text-1"})
    finally:
        _our_handler().setStream(None)
    (line,) = [line for line in buffer.getvalue().splitlines() if "app.access" in line]
    assert "INFO app.access: GET /health 200" in line and "request_id=text-1" in line and "status=200" in line


def test_formatter_extras_and_jwt_redaction():
    formatter = logs.JsonFormatter()
    token = jwt.encode({"sub": "x"}, SECRET, algorithm="HS256")
    record = logging.LogRecord("app.test", logging.WARNING, __file__, 1, "seen %s and %d", ("it", 3), None)
    record.peer_count = 4
    record.where = {"a": 1}
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "seen it and 3" and entry["peer_count"] == 4 and entry["where"] == {"a": 1}
    assert entry["level"] == "WARNING" and entry["logger"] == "app.test" and "request_id" not in entry
    record = logging.LogRecord("app.test", logging.INFO, __file__, 1, "header was %s", (token,), None)
    line = formatter.format(record)
    assert token not in line and token.split(".")[2] not in line and "[redacted-jwt]" in line
