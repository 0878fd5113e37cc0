"""POST /wireguard/tunnel in the app: what it relays, and each request it refuses before a datagram moves."""

import pytest

WG_DATA = b"\x04\x00\x00\x00" + b"d" * 28  # shaped like a transport data message
SINGLE, BATCH = "application/octet-stream", "application/x-wireguard-batch"


@pytest.fixture
def settings(settings, wireguard):
    return dict(settings, LISTEN_PORT=wireguard.getsockname()[1], TUNNEL_TARGET_HOST="127.0.0.1", TUNNEL_HOLD=2)


@pytest.fixture(autouse=True)
def _close_sessions(app):
    yield
    app.extensions["orbmesh_http_sessions"].reap(now=float("inf"))  # the session gauge is process-wide


def batch(*datagrams):
    return b"".join(len(d).to_bytes(2, "big") + d for d in datagrams)


def test_a_single_datagram_goes_up_and_the_answer_comes_back(client, auth, wireguard):
    headers = dict(auth(), **{"X-Tunnel-Session": "s-1", "X-Tunnel-Wait": "0"})
    response = client.post("/wireguard/tunnel", data=WG_DATA, content_type=SINGLE, headers=headers)
    assert response.status_code == 204 and response.headers["X-Tunnel-Session"] == "s-1"  # nothing came back yet
    data, pipe = wireguard.recvfrom(2048)
    assert data == WG_DATA
    wireguard.sendto(b"answer", pipe)
    response = client.post("/wireguard/tunnel", data=b"", content_type=SINGLE,
                           headers=dict(headers, **{"X-Tunnel-Wait": "2"}))
    assert (response.status_code, response.get_data(), response.mimetype) == (200, b"answer", SINGLE)


@pytest.mark.parametrize("content_type,headers,body,status,code", [
    ("text/plain", {}, WG_DATA, 415, "UNSUPPORTED_MEDIA_TYPE"),
    (SINGLE, {"X-Tunnel-Session": "bad name"}, WG_DATA, 400, "VALIDATION_ERROR"),
    (SINGLE, {"X-Tunnel-Wait": "3"}, WG_DATA, 400, "VALIDATION_ERROR"),  # over TUNNEL_HOLD
    (SINGLE, {"X-Tunnel-Wait": "soon"}, WG_DATA, 400, "VALIDATION_ERROR"),
    (BATCH, {}, b"\x00\x05abc", 400, "VALIDATION_ERROR"),  # a record longer than the body
    (BATCH, {}, batch(WG_DATA[:31]), 400, "VALIDATION_ERROR"),  # shorter than any WireGuard message
    (BATCH, {}, batch(WG_DATA) + b"\x00\x01x" * 1000, 400, "VALIDATION_ERROR"),  # the good record is not sent
    (SINGLE, {}, b"x" * 65536, 413, "PAYLOAD_TOO_LARGE"),
])
def test_refused_requests_send_nothing(client, auth, wireguard, content_type, headers, body, status, code):
    response = client.post("/wireguard/tunnel", data=body, content_type=content_type,
                           headers={**auth(), "X-Tunnel-Wait": "0", **headers})
    assert response.status_code == status, response.get_json()
    assert response.get_json()["error"]["code"] == code
    good = client.post("/wireguard/tunnel", data=batch(WG_DATA), content_type=BATCH,
                       headers=dict(auth(), **{"X-Tunnel-Wait": "0"}))
    assert good.status_code == 200  # the control: the same device, a good batch
    assert wireguard.recvfrom(2048)[0] == WG_DATA  # and only that one arrived
    wireguard.settimeout(0.05)
    with pytest.raises(TimeoutError):
        wireguard.recvfrom(2048)
