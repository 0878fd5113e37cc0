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


def test_read_frame_oversize(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME", 64)
    # The limit counts the newline, like encode().
    ok_frame = b"{" + b" " * 61 + b"}\n"
    assert len(ok_frame) == 64
    assert protocol.read_frame(io.BytesIO(ok_frame)) == ok_frame[:-1]
    for data in (b"{" + b" " * 62 + b"}\n", b"x" * 1000, b"x" * 1000 + b"\n"):
        with pytest.raises(ProtocolError) as info:
            protocol.read_frame(io.BytesIO(data))
        assert info.value.code == TOO_LARGE


def test_read_frame_truncated():
    with pytest.raises(ProtocolError) as info:
        protocol.read_frame(io.BytesIO(b'{"id": 1, "cmd"'))
    assert info.value.code == BAD_FRAME


def test_decode_oversize(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME", 16)
    with pytest.raises(ProtocolError) as info:
        protocol.decode(b'{"a": "0123456789abcdef"}')
    assert info.value.code == TOO_LARGE


@pytest.mark.parametrize("line", [
    b"", b"not json", b"{", b'{"a": 1}}', b"\xff\xfe", b'{"a": "\xc3"}',
    b"[1, 2]", b'"text"', b"42", b"null", b"true",          # not an object
    b"[" * 100000 + b"]" * 100000,                           # recursion bomb
    b'{"a":' * 9 + b"1" + b"}" * 9,                          # nests deeper than 8
    b'{"a": 1' + b"1" * 5000 + b"}",                         # giant integer
])
def test_decode_bad(line):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(line)
    assert info.value.code == BAD_FRAME


def test_depth_limit_allows_max_depth():
    line = b'{"a":' * 7 + b"1" + b"}" * 7
    protocol.decode(line)


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
