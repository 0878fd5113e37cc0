"""Rate limits and the device cap on the real stack (gunicorn gevent worker, helper, wireguard-go)."""
import json

import pytest

from orbmesh_relay.framing import SINGLE_TYPE

from .test_tunnel_bad_input_e2e import open_ws
from .wgclient import keypair
from .wsclient import Rejected

LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@pytest.fixture
def stack_env():
    return {"ORBMESH_CONNECT_RATE_LIMIT": "3", "ORBMESH_TUNNEL_RATE_LIMIT": "2", "ORBMESH_MAX_DEVICES_PER_USER": "2",
            "ORBMESH_TUNNEL_HOLD": "0"}


@pytest.fixture
def stack_workers():
    # Counts live in the worker (README): one worker, as deployed behind nginx's hash.
    return 1


def lower(headers):
    return {k.lower(): v for k, v in headers.items()}


def test_connect_rate_limit_and_device_cap(stack):
    token = stack.token("limited", "dev-a")
    key = keypair()[1]
    for remaining in (2, 1, 0):
        status, headers, _ = stack.request("POST", "/wireguard/connect", {"publicKey": key},
                                           {"Authorization": "Bearer " + token})
        headers = lower(headers)
        assert status == 200 and [headers[h] for h in LIMIT_HEADERS][:2] == ["3", str(remaining)]
    before = (stack.db_peers(), stack.wg_peers())
    status, headers, raw = stack.request("POST", "/wireguard/connect", {"publicKey": keypair()[1]},
                                         {"Authorization": "Bearer " + token})
    headers = lower(headers)
    assert status == 429 and json.loads(raw)["error"]["code"] == "RATE_LIMITED"
    assert headers["retry-after"] == headers["x-ratelimit-reset"] and int(headers["retry-after"]) >= 1
    assert (stack.db_peers(), stack.wg_peers()) == before

    # The cap: dev-a holds one place, dev-b takes the second, dev-c is refused and gets nothing.
    assert stack.connect("limited", "dev-b", keypair()[1])[0] == 200
    refused_key = keypair()[1]
    before = (stack.db_peers(), stack.wg_peers())
    status, body = stack.connect("limited", "dev-c", refused_key)
    assert status == 403 and body["error"]["code"] == "DEVICE_LIMIT"
    assert (stack.db_peers(), stack.wg_peers()) == before and refused_key not in before[1]
    # An existing device may still rekey; another user is not affected.
    new_key = keypair()[1]
    status, body = stack.connect("limited", "dev-b", new_key)
    assert status == 200 and new_key in stack.wg_peers()
    assert stack.connect("someone-else", "dev-c", keypair()[1])[0] == 200


def test_tunnel_sessions_are_rate_limited_on_both_transports(stack):
    token = stack.token("tunnels", "dev-t")
    ws = open_ws(stack, token)
    headers = {k.decode().lower(): v.decode() for k, v in ws.accepted.extra_headers}
    assert [headers[h] for h in LIMIT_HEADERS][:2] == ["2", "1"]  # on the 101 itself
    status, headers, _ = stack.request("POST", "/wireguard/tunnel", None,
                                       {"Authorization": "Bearer " + token, "Content-Type": SINGLE_TYPE,
                                        "X-Tunnel-Session": "s1"})
    assert status == 204 and lower(headers)["x-ratelimit-remaining"] == "0"
    with pytest.raises(Rejected) as refused:
        open_ws(stack, token)
    assert refused.value.status == 429
    assert json.loads(refused.value.body)["error"]["code"] == "RATE_LIMITED"
    assert "retry-after" in refused.value.headers and refused.value.headers["x-ratelimit-limit"] == "2"
    status, _, raw = stack.request("POST", "/wireguard/tunnel", None,
                                   {"Authorization": "Bearer " + token, "Content-Type": SINGLE_TYPE,
                                    "X-Tunnel-Session": "s2"})
    assert status == 429 and json.loads(raw)["error"]["code"] == "RATE_LIMITED"
    # The sessions already open keep working.
    status, _, _ = stack.request("POST", "/wireguard/tunnel", None,
                                 {"Authorization": "Bearer " + token, "Content-Type": SINGLE_TYPE,
                                  "X-Tunnel-Session": "s1"})
    assert status == 204
    assert ws.pump(timeout=0.2)
    ws.close()
