"""Tunnel transports against bad and hostile clients, on the real stack."""
import json
import socket
import time

import jwt
import pytest
from wsproto.extensions import PerMessageDeflate

from orbmesh_relay.framing import BATCH_TYPE, SINGLE_TYPE

from .stack import API_PORT, SERVER_ADDR, wait_for
from .wsclient import RawWebSocket, Rejected

pytestmark = pytest.mark.e2e
WG_SHAPED = bytes([4, 0, 0, 0]) + bytes(60)  # a data message WireGuard will discard


@pytest.fixture
def stack_env():
    return {"ORBMESH_WS_PING_INTERVAL": "1", "ORBMESH_TUNNEL_MAX_SESSIONS": "2"}


@pytest.fixture
def stack_workers():
    # The session cap is counted per worker process (README); with one
    # worker every connection of the test meets the same count.
    return 1


def open_ws(stack, token=None, headers=(), extensions=()):
    sock = stack.client.socket_in(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect((SERVER_ADDR, API_PORT))
    if token:
        headers = list(headers) + [("Authorization", "Bearer " + token)]
    return RawWebSocket(sock, "%s:%d" % (SERVER_ADDR, API_PORT), headers=headers, extensions=extensions)


def pump_until_closed(ws, limit=30):
    deadline = time.monotonic() + limit
    while ws.pump(timeout=0.5):
        assert time.monotonic() < deadline, "server never closed the connection"
    return ws.closed_with


def user_token(stack):
    now = int(time.time())
    return jwt.encode({"iss": "orbnet", "sub": "user-1", "exp": now + 300}, stack.secret, algorithm="HS256")


@pytest.mark.parametrize("who", ["none", "garbage", "user-token"])
def test_upgrade_without_device_token_is_401_and_no_101(stack, who):
    token = {"none": None, "garbage": "a.b.c", "user-token": user_token(stack)}[who]
    with pytest.raises(Rejected) as refused:
        open_ws(stack, token)
    assert refused.value.status == 401
    assert json.loads(refused.value.body) == {"success": False, "error": {
        "code": "UNAUTHORIZED", "message": "Invalid or expired device token"}}


def test_plain_get_is_a_400_envelope(stack):
    status, body = stack.call("GET", "/wireguard/ws", token=stack.token("u", "d"))
    assert status == 400 and body["success"] is False


def test_text_message_closes_with_1003(stack):
    ws = open_ws(stack, stack.token("u", "d"))
    ws.send_text("hello")
    assert pump_until_closed(ws) == 1003


def test_oversize_message_closes_with_1009(stack):
    ws = open_ws(stack, stack.token("u", "d"))
    ws.send_bytes(bytes([4, 0, 0, 0]) + bytes(70000))
    assert pump_until_closed(ws) == 1009


def test_permessage_deflate_is_never_negotiated(stack):
    ws = open_ws(stack, stack.token("u", "d"), extensions=[PerMessageDeflate()])
    assert ws.accepted.extensions == []
    ws.close()


def test_garbage_datagrams_are_dropped_and_counted(stack):
    ws = open_ws(stack, stack.token("u", "garbage"))
    for datagram in (b"x" * 100, bytes([9, 0, 0, 0]) + bytes(60), bytes([1, 1, 0, 0]) + bytes(60), b"\x04\x00\x00\x00"):
        ws.send_bytes(datagram)
    ws.send_bytes(WG_SHAPED)  # well-formed: passed on to WireGuard, which drops it itself
    assert ws.pump(timeout=0.5)
    ws.close()
    line = wait_for(lambda: [l for l in stack.app_log.read_text().splitlines()
                             if "tunnel ws session end" in l and "device=garbage" in l], timeout=20,
                    what="session end log line")[0]
    assert "up=1/64 " in line and "dropped=4" in line, line


def test_unanswered_ping_closes_with_1008_and_frees_the_slot(stack):
    token = stack.token("u", "halfopen")
    ws = open_ws(stack, token)
    other = open_ws(stack, token)
    with pytest.raises(Rejected) as refused:  # the cap is 2 in this module
        open_ws(stack, token)
    assert refused.value.status == 429
    assert json.loads(refused.value.body)["error"]["code"] == "TOO_MANY_SESSIONS"

    ws.auto_pong = False
    assert pump_until_closed(ws) == 1008
    # The server closed at the first ping it found unanswered: the client saw exactly one.
    assert ws.pings == 1
    wait_for(lambda: _can_open(stack, token), timeout=20, what="a freed session slot")
    other.close()


def _can_open(stack, token):
    try:
        open_ws(stack, token).close()
    except Rejected:
        return False
    return True


@pytest.mark.parametrize("case,body,content_type,headers,status,code", [
    ("no-token", b"", BATCH_TYPE, {"Authorization": ""}, 401, "UNAUTHORIZED"),
    ("wrong-type", b"{}", "application/json", {}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("cut-prefix", b"\x00", BATCH_TYPE, {}, 400, "VALIDATION_ERROR"),
    ("cut-record", b"\x00\x40" + WG_SHAPED[:10], BATCH_TYPE, {}, 400, "VALIDATION_ERROR"),
    ("zero-record", b"\x00\x00", BATCH_TYPE, {}, 400, "VALIDATION_ERROR"),
    ("oversize", b"\x00\x40" + WG_SHAPED * 20000, BATCH_TYPE, {}, 413, "PAYLOAD_TOO_LARGE"),
    ("bad-wait", b"", BATCH_TYPE, {"X-Tunnel-Wait": "forever"}, 400, "VALIDATION_ERROR"),
    ("long-wait", b"", BATCH_TYPE, {"X-Tunnel-Wait": "9999"}, 400, "VALIDATION_ERROR"),
    ("bad-session", b"", BATCH_TYPE, {"X-Tunnel-Session": "../x"}, 400, "VALIDATION_ERROR"),
])
def test_http_tunnel_bad_requests(stack, case, body, content_type, headers, status, code):
    all_headers = {"Authorization": "Bearer " + stack.token("u", "http"), "Content-Type": content_type}
    all_headers.update(headers)
    if not all_headers["Authorization"]:
        del all_headers["Authorization"]
    got, _, raw = stack.client.http("POST", "http://%s:%d/wireguard/tunnel" % (SERVER_ADDR, API_PORT),
                                    headers=all_headers, body=body, timeout=30)
    assert got == status, raw[:200]
    assert json.loads(raw)["error"]["code"] == code


def test_http_tunnel_user_token_is_refused(stack):
    got, _, raw = stack.client.http("POST", "http://%s:%d/wireguard/tunnel" % (SERVER_ADDR, API_PORT),
                                    headers={"Authorization": "Bearer " + user_token(stack),
                                             "Content-Type": SINGLE_TYPE}, body=WG_SHAPED)
    assert got == 401 and json.loads(raw)["error"]["message"] == "Invalid or expired device token"


def test_http_tunnel_empty_poll_answers_after_wait(stack):
    headers = {"Authorization": "Bearer " + stack.token("u", "poll"), "Content-Type": SINGLE_TYPE,
               "X-Tunnel-Wait": "0.2"}
    got, response_headers, raw = stack.client.http(
        "POST", "http://%s:%d/wireguard/tunnel" % (SERVER_ADDR, API_PORT), headers=headers, body=b"")
    assert got == 204 and raw == b"" and response_headers["X-Tunnel-Session"] == "default"
    headers["Content-Type"] = BATCH_TYPE
    got, _, raw = stack.client.http(
        "POST", "http://%s:%d/wireguard/tunnel" % (SERVER_ADDR, API_PORT), headers=headers, body=b"")
    assert got == 200 and raw == b""
