import io

import pytest

from wghelper import protocol
from wghelper.protocol import BAD_FRAME, TOO_LARGE, ProtocolError


def test_round_trip():
    message = {"id": 7, "cmd": "apply_peers", "args": {"add": [{"a": "ü", "b": [1, 2]}]}}
    frame = protocol.encode(message)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert frame.isascii()
    assert protocol.decode(frame) == message
    assert protocol.decode(frame[:-1]) == message
    assert protocol.parse_request(protocol.decode(frame)) == (7, "apply_peers", message["args"])


def test_read_frame_splits_a_stream():
    stream = io.BytesIO(protocol.encode({"id": 1, "cmd": "a"}) + protocol.encode({"id": 2, "cmd": "b"}))
    assert protocol.decode(protocol.read_frame(stream))["id"] == 1
    assert protocol.decode(protocol.read_frame(stream))["id"] == 2
    assert protocol.read_frame(stream) is None


def test_encode_refuses_oversize(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME", 64)
    protocol.encode({"x": "a" * 40})
    with pytest.raises(ProtocolError) as info:
        protocol.encode({"x": "a" * 100})
    assert info.value.code == TOO_LARGE


def test_read_frame_oversize():
    # The limit counts the newline, like encode().
    ok_frame = b"{" + b" " * 61 + b"}\n"
    assert len(ok_frame) == 64
    assert protocol.read_frame(io.BytesIO(ok_frame), 64) == ok_frame[:-1]
    for data in (b"{" + b" " * 62 + b"}\n", b"x" * 1000, b"x" * 1000 + b"\n"):
        with pytest.raises(ProtocolError) as info:
            protocol.read_frame(io.BytesIO(data), 64)
        assert info.value.code == TOO_LARGE


def test_read_frame_truncated():
    with pytest.raises(ProtocolError) as info:
        protocol.read_frame(io.BytesIO(b'{"id": 1, "cmd"'))
    assert info.value.code == BAD_FRAME


@pytest.mark.parametrize("line", [
    b"", b"not json", b"{", b'{"a": 1}}', b"\xff\xfe", b'{"a": "\xc3"}',
    b"[1, 2]", b'"text"', b"42", b"null", b"true",          # not an object
    b"[" * 100000 + b"]" * 100000,                           # recursion bomb
    b'{"a": 1' + b"1" * 5000 + b"}",                         # giant integer
])
def test_decode_bad(line):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(line)
    assert info.value.code == BAD_FRAME


def test_nesting_json_can_parse_is_left_to_the_validators():
    assert protocol.decode(b'{"a":' * 50 + b"1" + b"}" * 50)["a"]["a"]["a"]


@pytest.mark.parametrize("message", [
    {"id": 1},                                   # no cmd
    {"id": 1, "cmd": 5},
    {"id": "1", "cmd": "hello"},
    {"id": True, "cmd": "hello"},
    {"id": 1.5, "cmd": "hello"},
    {"id": 1, "cmd": "hello", "args": []},
    {"id": 1, "cmd": "hello", "args": "x"},
    {"id": 1, "cmd": "hello", "extra": 1},
])
def test_bad_envelope(message):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(message)
    assert info.value.code == BAD_FRAME


def test_envelope_defaults():
    assert protocol.parse_request({"cmd": "hello"}) == (None, "hello", {})


def test_replies():
    assert protocol.ok(3, {"a": 1}) == {"id": 3, "ok": True, "result": {"a": 1}}
    assert protocol.error(3, "X", "m") == {"id": 3, "ok": False, "error": {"code": "X", "message": "m"}}
    assert protocol.error(None, "X", "m", {"f": 1})["error"]["details"] == {"f": 1}


def read(frame, items):
    """read_request as the helper runs it: a first readline of SMALL_FRAME + 1, then the rest."""
    stream = io.BytesIO(frame)
    return protocol.read_request(stream, stream.readline(protocol.SMALL_FRAME + 1), items)


def request(cmd, body):
    return b'{"id":1,"cmd":"%s","args":%s}\n' % (cmd.encode(), body)


def test_the_largest_batches_the_app_sends_fit_their_limits():
    """A sync of a whole /16 pool, each peer as large as the app makes one (app/helper.py peer_spec)."""
    spec = {"public_key": "A" * 43 + "=", "allowed_ips": ["10.8.255.254/32"], "keepalive": 65535,
            "endpoint": "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"}
    items = 65534
    for cmd, args in (("sync_peers", {"peers": [spec] * items}),
                      ("apply_peers", {"add": [spec] * (items // 2), "remove": [spec["public_key"]] * (items // 2)}),
                      ("bridge_rules", {"add": [{"address": "10.8.255.254", "slot": 63}] * items, "exclusive": True})):
        frame = protocol.encode({"id": 2 ** 31, "cmd": cmd, "args": args})
        size, values = protocol.request_limits(frame[:protocol.SMALL_FRAME + 1], items)
        assert len(frame) <= size and frame.count(b"{") + frame.count(b"[") + frame.count(b",") <= values, cmd
        assert read(frame, items) == frame[:-1]


def test_request_limits_follow_the_command_and_the_pool():
    assert protocol.request_limits(request("hello", b"{}"), 65536) == (4096, 4096)
    for cmd in protocol.BATCHES:
        assert protocol.request_limits(request(cmd, b"{}"), 254) == (4096 + 256 * 254, 64 + 8 * 254)
    assert protocol.request_limits(request("sync_peers", b"{}"), 65536)[0] == protocol.MAX_FRAME
    # The command must be named in the first SMALL_FRAME bytes.
    late = b'{"args":{"x":"' + b"a" * 5000 + b'"},"cmd":"sync_peers"}\n'
    assert protocol.request_limits(late, 65536) == (4096, 4096)


def test_read_request_bounds_bytes_and_values_before_parsing():
    peer = b'{"public_key":"%s","allowed_ips":["10.8.0.2/32"],"endpoint":null,"keepalive":0}' % (b"A" * 43 + b"=")
    legit = request("sync_peers", b'{"peers":[' + b",".join([peer] * 254) + b"]}")
    assert read(legit, 254) == legit[:-1]  # control: the largest sync of a /24 pool
    for frame in (request("hello", b'{"x":"' + b"a" * 5000 + b'"}'),           # over 4 KiB, not a batch
                  request("sync_peers", b'{"x":"' + b"a" * 70000 + b'"}'),     # over the batch's bytes
                  request("sync_peers", b'{"peers":[' + b"{}," * 3000 + b"{}]}"),  # few bytes, many values
                  late_command()):
        with pytest.raises(ProtocolError) as info:
            read(frame, 254)
        assert info.value.code == TOO_LARGE


def late_command():
    return b'{"args":{"peers":[' + b"{}," * 3000 + b'{}]},"cmd":"sync_peers"}\n'
