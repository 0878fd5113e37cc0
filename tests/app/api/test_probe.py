"""POST /wireguard/probe and the UDP echo behind it (the relay's "is UDP back?")."""
import base64
import json
import os
import socket
import stat

import pytest

from app.api import probe as app_probe
from app.ops import shutdown
from orbmesh_relay import probe

REAL_BIND = app_probe.Echo._bind


@pytest.fixture
def settings(settings):
    return dict(settings, PROBE_PORT=51822)


@pytest.fixture(autouse=True)
def loopback_echo(monkeypatch):
    """Unit tests bind the echo to loopback on a free port, never the host's wildcard address."""
    def bind(host, port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        return sock
    monkeypatch.setattr(app_probe.Echo, "_bind", staticmethod(bind))


@pytest.fixture
def echo_of(app):
    made = []

    def get():
        running = app.extensions["orbmesh_probe"]["echo"]
        if running is not None and running not in made:
            made.append(running)
        return running
    yield get
    for running in made:
        running.close()


def ask(client, auth, body=b"{}"):
    return client.post("/wireguard/probe", data=body, headers=dict(auth(), **{"Content-Type": "application/json"}))


def probe_once(port, answer_key, ticket, data=None, timeout=5):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        nonce = os.urandom(8)
        sock.sendto(data if data is not None else probe.request(ticket, answer_key, nonce), ("127.0.0.1", port))
        try:
            reply, _ = sock.recvfrom(1024)
        except socket.timeout:
            return None
        return reply, nonce, sock.getsockname()
    finally:
        sock.close()


def test_a_ticket_and_an_echo_that_answers_its_probes(client, auth, app, echo_of):
    assert echo_of() is None  # no socket until a relay asks
    response = ask(client, auth)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"success", "port", "ticket", "key", "expiresIn", "serverTime"} and body["success"]
    ticket, key = base64.b64decode(body["ticket"]), base64.b64decode(body["key"])
    assert len(ticket) == probe.TICKET_SIZE and body["expiresIn"] == probe.TICKET_TTL
    assert body["port"] == echo_of().port
    reply, nonce, local = probe_once(body["port"], key, ticket)
    assert len(reply) == probe.SIZE and probe.parse_reply(reply, key) == (nonce, ("127.0.0.1", local[1]))
    # The secret behind the keys is made once, 0600, and kept.
    path = app.config["PROBE_KEY_FILE"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(open(path, "rb").read()) == 32
    assert ask(client, auth).status_code == 200 and echo_of() is echo_of()  # one echo per worker


def test_the_echo_answers_nothing_else(client, auth, echo_of):
    body = ask(client, auth).get_json()
    ticket, key = base64.b64decode(body["ticket"]), base64.b64decode(body["key"])
    good = probe.request(ticket, key, os.urandom(8))
    for data in (b"", b"hello", good[:-1], good + b"x" * 100, good[:-1] + bytes([good[-1] ^ 1]),
                 probe.request(ticket, b"k" * 32, os.urandom(8))):
        assert probe_once(body["port"], key, ticket, data=data, timeout=0.3) is None
    assert echo_of().refused >= 6
    assert probe_once(body["port"], key, ticket) is not None  # control: still answering good ones


def test_another_instance_with_the_same_key_file_answers_the_same_tickets(client, auth, app, echo_of, settings,
                                                                          monkeypatch):
    from app import create_app
    body = ask(client, auth).get_json()
    other = create_app(dict(settings, DB_PATH=str(app.config["DB_PATH"]) + ".other",
                            PROBE_KEY_FILE=app.config["PROBE_KEY_FILE"]))
    with other.app_context():
        running = app_probe.echo()
    try:
        ticket, key = base64.b64decode(body["ticket"]), base64.b64decode(body["key"])
        assert probe_once(running.port, key, ticket) is not None
    finally:
        running.close()


def test_probes_off(client, auth, app, echo_of):
    app.config["PROBE_PORT"] = 0
    response = ask(client, auth)
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "NOT_FOUND"
    assert echo_of() is None


@pytest.mark.parametrize("headers, body, status, code", [
    ({}, b"{}", 401, "UNAUTHORIZED"),
    ({"Authorization": "Bearer not-a-token"}, b"{}", 401, "UNAUTHORIZED"),
    (None, b"{not json", 400, "VALIDATION_ERROR"),
    (None, b'{"port": 1}', 400, "VALIDATION_ERROR"),
    (None, b"[]", 400, "VALIDATION_ERROR"),
])
def test_bad_requests_get_the_envelope_and_start_nothing(client, auth, echo_of, headers, body, status, code):
    headers = auth() if headers is None else headers
    response = client.post("/wireguard/probe", data=body, headers=dict(headers, **{"Content-Type": "application/json"}))
    assert response.status_code == status
    answer = response.get_json()
    assert answer["success"] is False and answer["error"]["code"] == code and answer["error"]["message"]
    assert echo_of() is None


def test_tickets_are_rate_limited_like_tunnel_sessions(app, client, auth, echo_of):
    app.extensions["orbmesh_rate_limits"]["tunnel"].limit = 2
    assert [ask(client, auth).status_code for _ in range(3)] == [200, 200, 429]


def test_an_unusable_key_file_is_a_404_not_a_500(client, auth, app, echo_of, tmp_path, caplog):
    bad = tmp_path / "probe.key"
    bad.write_bytes(b"short")
    app.config["PROBE_KEY_FILE"] = str(bad)
    response = ask(client, auth)
    assert response.status_code == 404 and echo_of() is None
    assert bad.read_bytes() == b"short"  # an operator's file is never replaced


def test_a_stopping_worker_closes_its_echo(client, auth, echo_of):
    ask(client, auth)
    running = echo_of()
    shutdown.close_all()
    assert running.closed and running.sock.fileno() == -1


def test_the_key_never_reaches_the_logs(client, auth, caplog):
    caplog.set_level("DEBUG")
    body = ask(client, auth).get_json()
    text = "\n".join(r.getMessage() for r in caplog.records) + json.dumps([r.__dict__.get("args") for r in
                                                                             caplog.records], default=str)
    assert body["key"] not in text and body["ticket"] not in text


def test_read_secret_makes_one_and_keeps_it(tmp_path):
    path = str(tmp_path / "k")
    first = app_probe.read_secret(path)
    assert len(first) == 32 and app_probe.read_secret(path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


@pytest.mark.parametrize("host, family", [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_every_worker_binds_the_same_port(host, family):
    first = REAL_BIND(host, 0)
    try:
        assert first.family == family and first.getsockname()[0] == host
        second = REAL_BIND(host, first.getsockname()[1])  # SO_REUSEPORT: the kernel spreads probes over both
        second.close()
    finally:
        first.close()
