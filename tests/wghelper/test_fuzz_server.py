"""Hypothesis against the helper's socket: a real Server on a temporary socket, fake runner behind it.

Whatever arrives (random bytes, wrong types, deep nesting, unknown commands,
bad arguments, truncated or oversized frames) is answered with a clean error
reply (never INTERNAL), or, for framing violations, with one error reply and
a closed connection, as wghelper/protocol.py defines; and the helper keeps
serving: a hello on the same connection (when it stays open) and on a new one
still works.  ORBMESH_FUZZ_EXAMPLES sets the examples per test.
"""
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wghelper import protocol
from wghelper.handlers import HANDLERS

from tests.fuzz_hooks import report

from .test_server import Served
from .fakes import key

EXAMPLES = int(os.environ.get("ORBMESH_FUZZ_EXAMPLES", "25")) * 4
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
CLEAN_ERRORS = {protocol.BAD_FRAME, protocol.UNKNOWN_COMMAND, protocol.INVALID_ARGUMENT,
                protocol.COMMAND_FAILED, protocol.INTERFACE_DOWN}
COUNT = {"frames": 0}


def count_frame():
    COUNT["frames"] += 1
    report("hypothesis (helper socket)", "%d frames sent, %d examples per test" % (COUNT["frames"], EXAMPLES),
           key="frames")

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=50)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
# Near-valid pieces, so the validators behind each command are reached, not only the envelope.
peer_values = st.fixed_dictionaries(
    {"public_key": st.sampled_from([key(1), key(2), "x" * 44, "", key(3)[:-1]]) | st.text(max_size=50)},
    optional={"allowed_ips": st.lists(st.sampled_from(["10.8.0.2/32", "10.8.0.0/16", "0.0.0.0/0", "10.8.0.1/32",
                                                        "2001:db8::1/128", "10.8.0.300/32"]) | st.text(max_size=20),
                                      max_size=3) | json_values,
              "endpoint": st.sampled_from(["192.0.2.1:51820", "[2001:db8::1]:1", "evil.example:53", "1.2.3.4:0"])
              | json_values,
              "keepalive": st.integers(-5, 70000) | json_values,
              "interface": st.text(max_size=10)})
user_values = st.fixed_dictionaries(  # limits
    {"user": st.sampled_from(["u1", "u 1", "", "a" * 129]) | json_values,
     "addresses": st.lists(st.sampled_from(["10.8.0.2", "10.8.0.1", "fd00::2", "10.8.0.2/32"]) | json_values,
                           max_size=3) | json_values},
    optional={"rate_mbps": st.sampled_from([0, 1, 20, 100001, 2.5, None, True]) | json_values,
              "quota": st.integers(-2, 2**64) | json_values, "used": st.integers(-2, 2**64) | json_values,
              "period": st.integers(-2, 2**64) | json_values})
since_values = st.fixed_dictionaries(  # usage
    {"boot": st.sampled_from(["12345678-aaaa-bbbb-cccc-1234567890ab", "x"]) | json_values,
     "taken_at": st.floats() | st.integers(-2, 2**64) | json_values})
arg_values = st.dictionaries(st.sampled_from(["peers", "public_keys", "add", "remove", "interface", "users", "since",
                                              "fresh", "replace"]) | st.text(max_size=8),
                             st.lists(peer_values, max_size=3) | st.lists(st.text(max_size=50), max_size=3)
                             | st.lists(user_values, max_size=3) | since_values | json_values, max_size=3)
requests = st.fixed_dictionaries(
    {"cmd": st.sampled_from(sorted(HANDLERS)) | st.sampled_from(["", "rm", "hello ", "HELLO", "__class__"])
     | st.text(max_size=30) | json_values},
    optional={"id": st.integers(-2**63, 2**63) | json_values, "args": arg_values | json_values,
              "extra": json_values})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("fuzz-helper"))
    yield s
    s.close()


def assert_serving(served):
    conn = served.connect()
    try:
        reply = conn.call("hello", req_id=7)
        assert reply["ok"] is True and reply["id"] == 7 and reply["result"]["interface"] == "wgt0"
    finally:
        conn.close()


def hung_up(conn):
    """The helper closed the connection (EOF, or a reset because our bytes were left unread)."""
    try:
        return conn.at_eof()
    except ConnectionResetError:
        return True


def assert_clean(reply):
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        error = reply["error"]
        assert error["code"] in CLEAN_ERRORS, reply
        assert isinstance(error["message"], str) and "Traceback" not in error["message"]


def exchange(served, frame):
    """Send one frame on a new connection; return (reply, connection still serves hello)."""
    conn = served.connect()
    try:
        conn.send(frame)
        reply = conn.reply()
        count_frame()
        follow = conn.call("hello", req_id=99)
        return reply, follow
    except (BrokenPipeError, ConnectionResetError):
        return reply, None
    finally:
        conn.close()


@FUZZ
@given(message=requests)
def test_any_request_object_gets_a_clean_reply_and_the_connection_keeps_working(served, message):
    reply, follow = exchange(served, json.dumps(message).encode() + b"\n")
    assert_clean(reply)
    # A well-framed request never costs the connection.
    assert follow is not None and follow["ok"] and follow["id"] == 99


@FUZZ
@given(body=st.binary(max_size=2048).map(lambda b: b.replace(b"\n", b"")))
def test_random_bytes_are_a_bad_frame(served, body):
    reply, follow = exchange(served, body + b"\n")
    assert_clean(reply)
    assert follow is not None and follow["ok"]


@FUZZ
@given(depth=st.integers(9, 200_000), kind=st.sampled_from(["list", "dict"]))
def test_deep_nesting_is_refused_without_recursion(served, depth, kind):
    inner = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    # A batch command: its size limit admits the deepest of these (a hello's 4 KiB would not).
    reply, follow = exchange(served, ('{"id":1,"cmd":"sync_peers","args":{"x":%s}}' % inner).encode() + b"\n")
    # Past json's recursion limit a bad frame; before it, the validators refuse the argument.
    assert reply["error"]["code"] in (protocol.BAD_FRAME, protocol.INVALID_ARGUMENT), reply
    assert follow is not None and follow["ok"]


@FUZZ
@given(message=requests, cut=st.integers(0, 400))
def test_a_truncated_frame_gets_one_error_and_a_closed_connection(served, message, cut):
    frame = json.dumps(message).encode()[:cut]
    conn = served.connect()
    try:
        conn.send(frame)
        conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.reply()
        count_frame()
        if frame:
            assert reply["ok"] is False and reply["error"]["code"] == protocol.BAD_FRAME
            assert hung_up(conn)
        else:
            assert reply is None  # nothing sent: a clean end of stream
    finally:
        conn.close()
    assert_serving(served)


def test_an_oversized_frame_is_too_large_and_closes(served):
    conn = served.connect()
    try:
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(protocol.MAX_FRAME // len(chunk) + 2):
                conn.send(chunk)
        except BrokenPipeError:
            pass  # the helper hung up after SMALL_FRAME + 1 bytes, as it should; its reply is already queued
        reply = conn.reply()
        assert reply["ok"] is False and reply["error"]["code"] == protocol.TOO_LARGE
        assert hung_up(conn)
    finally:
        conn.close()
    assert_serving(served)


def test_many_requests_on_one_connection_then_hello(served):
    """One connection carries a run of bad requests and still answers hello at the end."""
    conn = served.connect()
    try:
        for frame in (b"{}", b"[]", b"null", b'{"cmd":1}', b'{"cmd":"nope"}', b'{"cmd":"hello","args":[]}',
                      b'{"cmd":"apply_peers","args":{"add":[{"public_key":null}]}}', b"\xff\xfe", b'"\\ud800"'):
            conn.send(frame + b"\n")
            assert_clean(conn.reply())
        assert conn.call("hello", req_id=5)["ok"] is True
    finally:
        conn.close()
