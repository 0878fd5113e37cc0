"""The exit registry (a file or OrbNET's URL, with a cached copy) and the client of an exit's API."""
import http.server
import json
import logging
import os
import stat
import threading

import pytest

from app.bridge import exits
from app.failures import BridgeUnavailable
from tests.app.bridge.exitstub import SlowExit
from tests.conftest import BRIDGE_KEY, make_key

API_KEY = "exit-api-key-0123456789-secret"
EXIT = {"id": "exit-1", "endpoint": "198.51.100.1:51820", "publicKey": make_key(77),
        "apiUrl": "https://198.51.100.1:8443/", "apiKey": API_KEY, "bridgeAddress": "10.9.255.1"}


def test_parse_skips_bad_entries_without_logging_values(caplog):
    bad = [dict(EXIT, id="no-key", publicKey="AAAA"), dict(EXIT, id="dup"), dict(EXIT, id="dup"),
           dict(EXIT, id="mc", bridgeAddress="224.0.0.1"), "junk", dict(EXIT, id="x", apiUrl="ftp://h/"),
           {k: v for k, v in EXIT.items() if k != "apiKey"}, dict(EXIT, extra="ignored")]
    with caplog.at_level(logging.WARNING):
        parsed = exits.parse({"exits": bad})
    assert sorted(parsed) == ["dup", "exit-1"]
    assert parsed["exit-1"]["apiUrl"] == "https://198.51.100.1:8443" and "extra" not in parsed["exit-1"]
    text = caplog.text
    assert "skipping entry 0 (no-key): bad publicKey" in text and "duplicate id" in text
    assert "bad apiUrl" in text and "bad bridgeAddress" in text and "(no id)" in text
    assert API_KEY not in text
    with pytest.raises(ValueError):
        exits.parse({"exits": "x"})


@pytest.mark.parametrize("endpoint", ["127.0.0.1:51820", "[::1]:51820", "[::ffff:127.0.0.1]:51820",
                                      "255.255.255.255:51820", "224.0.0.1:51820", "0.0.0.0:51820", "[::]:51820"])
def test_an_exit_endpoint_that_is_no_other_host_is_skipped(caplog, endpoint):
    """The bridge would send this node's tunnel there: its own services, everyone, nowhere (issue 23)."""
    with caplog.at_level(logging.WARNING):
        parsed = exits.parse({"exits": [dict(EXIT, id="odd", endpoint=endpoint), EXIT]})
    assert sorted(parsed) == ["exit-1"]  # the control: the good entry beside it is taken
    assert "skipping entry 0 (odd): bad endpoint" in caplog.text


def test_plain_http_exits_only_when_allowed(caplog):
    plain = [dict(EXIT, id="plain", apiUrl="http://198.51.100.1:8080"), EXIT]
    with caplog.at_level(logging.WARNING):
        assert sorted(exits.parse({"exits": plain})) == ["exit-1"]
    assert "skipping entry 0 (plain): bad apiUrl (http:// needs ORBMESH_EXIT_ALLOW_HTTP)" in caplog.text
    assert sorted(exits.parse({"exits": plain}, allow_http=True)) == ["exit-1", "plain"]


def test_a_plain_http_registry_url_refuses_to_start(settings):
    from app import create_app
    from app.config import ConfigError
    with pytest.raises(ConfigError, match="EXIT_REGISTRY_URL: must be https"):
        create_app(dict(settings, EXIT_REGISTRY_URL="http://192.0.2.9/exits"))
    create_app(dict(settings, EXIT_REGISTRY_URL="http://192.0.2.9/exits", EXIT_ALLOW_HTTP=True,
                    RECONCILE_CHECK_INTERVAL=0))  # allowed on a private link
    create_app(dict(settings, EXIT_REGISTRY_URL="https://192.0.2.9/exits"))


def test_an_exit_that_answers_one_byte_at_a_time_is_given_up_on_at_the_deadline():
    slow = SlowExit(interval=0.5)
    try:
        client = exits.ExitClient({"EXIT_API_TIMEOUT": 1.0, "SMARTCONNECT_HEALTH_TTL": 0})
        with pytest.raises(BridgeUnavailable) as info:
            client.unregister(dict(EXIT, apiUrl=slow.url), "me", BRIDGE_KEY)
        assert info.value.code == "BRIDGE_UNAVAILABLE"
        assert slow.received.is_set() and not slow.finished.is_set()
    finally:
        slow.stop()


def _config(tmp_path, **extra):
    config = {"EXIT_REGISTRY_URL": "", "EXIT_REGISTRY_FILE": "", "EXIT_REGISTRY_INTERVAL": 0.1, "EXIT_ALLOW_HTTP": True,
              "EXIT_REGISTRY_CACHE": str(tmp_path / "cache.json"), "EXIT_API_TIMEOUT": 2.0}
    config.update(extra)
    return config


def test_file_registry_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "exits.json"
    path.write_text(json.dumps([EXIT]))
    registry = exits.Registry(_config(tmp_path, EXIT_REGISTRY_FILE=str(path)))
    assert registry.get("exit-1")["bridgeAddress"] == "10.9.255.1"
    path.write_text(json.dumps([dict(EXIT, id="exit-2", bridgeAddress="10.9.255.2")]))
    os.utime(path, ns=(1, 1))
    assert registry.get("exit-1") is None and registry.get("exit-2")
    path.write_text("{broken")
    os.utime(path, ns=(2, 2))
    assert registry.get("exit-2")  # an unreadable file keeps the last good copy


@pytest.fixture
def orbnet():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"exits": [EXIT]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_url_registry_cached_copy_survives_orbnet_down_and_restart(tmp_path, orbnet, caplog):
    url = "http://127.0.0.1:%d/exits" % orbnet.server_address[1]
    config = _config(tmp_path, EXIT_REGISTRY_URL=url)
    registry = exits.Registry(config)
    assert registry.get("exit-1")["endpoint"] == "198.51.100.1:51820"
    cache = tmp_path / "cache.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    orbnet.shutdown()
    orbnet.server_close()
    registry.refresh(force=True)
    assert registry.get("exit-1")  # OrbNET down: the last good copy
    restarted = exits.Registry(config)
    assert restarted.exits and restarted.get("exit-1")  # after a restart, from the disk copy
    assert "keeping the last good copy" in caplog.text and API_KEY not in caplog.text


def test_exit_client_never_follows_redirects_with_the_key(tmp_path):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append((self.path, self.headers.get("X-API-Key")))
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = exits.ExitClient({"EXIT_API_TIMEOUT": 2.0, "SMARTCONNECT_HEALTH_TTL": 0})
        target = dict(EXIT, apiUrl="http://127.0.0.1:%d" % server.server_address[1])
        with pytest.raises(BridgeUnavailable) as info:
            client.register(target, "me", BRIDGE_KEY)
        assert info.value.code == "BRIDGE_UNAVAILABLE"
        assert seen == [("/wireguard/add-peer", API_KEY)]
        assert client.healthy(dict(EXIT, apiUrl="http://127.0.0.1:1")) is False
    finally:
        server.shutdown()
        server.server_close()
