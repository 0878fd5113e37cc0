"""The helper's socket server, in-process, with the fake runner behind it."""
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from wghelper import protocol
from wghelper.server import Server

from .fakes import Helper, key, peer, settings

NOBODY = 65534


class Served:
    def __init__(self, tmp_path, idle_timeout=5.0, dispatch=None, **overrides):
        # Not under tmp_path: pytest makes that 0700, and the "nobody" client
        # must be able to reach the socket.
        self.dir = tempfile.mkdtemp(prefix="omsrv-")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "run", "h.sock")
        self.helper = Helper(tmp_path).start()
        overrides.setdefault("helper_socket_group", str(NOBODY))
        self.settings = settings(helper_socket=self.path, **overrides)
        kwargs = {"dispatch": dispatch} if dispatch else {}
        self.server = Server(self.settings, self.helper.ctx, idle_timeout=idle_timeout, **kwargs)
        self.server.bind()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def calls(self):
        return self.helper.runner.calls

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.path)
        return Conn(sock)

    def close(self):
        self.server.close()
        self.thread.join(5)
        self.helper.writer.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.reader = sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        line = self.reader.readline()
        return json.loads(line) if line else None

    def call(self, cmd, args=None, req_id=1):
        self.send(protocol.encode({"id": req_id, "cmd": cmd, "args": args or {}}))
        return self.reply()

    def at_eof(self):
        return self.reader.read() == b""

    def close(self):
        self.reader.close()
        self.sock.close()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.close()


def test_socket_file(served):
    info = os.stat(served.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (0, NOBODY)
    assert stat.S_IMODE(os.stat(os.path.dirname(served.path)).st_mode) == 0o755


def test_requests_on_one_connection(served):
    conn = served.connect()
    first = conn.call("hello", req_id=41)
    assert first["id"] == 41 and first["ok"] and first["result"]["interface"] == "wgt0"
    added = conn.call("apply_peers", {"add": [peer(key(1))]}, req_id=42)
    assert added == {"id": 42, "ok": True, "result": {"removed": 0, "applied": 1}}
    assert served.calls[-1][:2] == ["wg", "set"]
    conn.close()


def test_unknown_command(served):
    conn = served.connect()
    reply = conn.call("rm_rf", req_id=9)
    assert reply["id"] == 9 and reply["error"]["code"] == protocol.UNKNOWN_COMMAND
    assert served.calls == []


def test_invalid_arguments_reach_no_command(served):
    conn = served.connect()
    for args in ({"add": [peer("x" * 44)]}, {"add": [peer(key(1), "10.8.0.1/32")]},
                 {"add": [peer(key(1), endpoint="evil.example:53")]}, {"add": "all"},
                 {"add": [peer(key(1))], "interface": "eth0"}):
        reply = conn.call("apply_peers", args)
        assert reply["error"]["code"] == protocol.INVALID_ARGUMENT, args
        assert reply["error"]["details"]["field"]
    assert served.calls == []


@pytest.mark.parametrize("frame, req_id", [
    (b"not json\n", None),
    (b"[1, 2]\n", None),
    (b"\xff\xfe\n", None),
    (b'{"id": 5, "cmd": 1}\n', 5),
    (b'{"id": 6, "cmd": "hello", "args": [], "x": 1}\n', 6),
    (b'{"id": "7", "cmd": "hello"}\n', None),
    (b"\n", None),
])
def test_malformed_frames_are_answered_and_the_connection_lives(served, frame, req_id):
    conn = served.connect()
    conn.send(frame)
    reply = conn.reply()
    assert reply["ok"] is False and reply["id"] == req_id
    assert reply["error"]["code"] == protocol.BAD_FRAME
    assert conn.call("hello")["ok"]
    assert served.calls == []


def test_oversize_frame_closes_the_connection(served, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME", 1024)
    conn = served.connect()
    conn.send(b'{"id": 1, "cmd": "hello", "args": {"x": "' + b"a" * 4000 + b'"}}\n')
    reply = conn.reply()
    assert reply["error"]["code"] == protocol.TOO_LARGE
    assert conn.at_eof()
    assert served.connect().call("hello")["ok"]
    assert served.calls == []


def test_truncated_frame_closes_the_connection(served):
    conn = served.connect()
    conn.send(b'{"id": 1, "cmd": "apply_peers", "args": {"add": [')
    conn.sock.shutdown(socket.SHUT_WR)
    reply = conn.reply()
    assert reply["error"]["code"] == protocol.BAD_FRAME
    assert conn.at_eof()
    assert served.connect().call("hello")["ok"]
    assert served.calls == []


def test_client_hanging_up_mid_stream_does_not_hurt(served):
    for _ in range(20):
        conn = served.connect()
        conn.send(b'{"id": 1, "cmd": "hel')
        conn.close()
    assert served.connect().call("hello")["ok"]


def test_idle_connection_times_out(tmp_path):
    s = Served(tmp_path, idle_timeout=0.3)
    try:
        conn = s.connect()
        started = time.monotonic()
        assert conn.at_eof()
        assert time.monotonic() - started < 3
    finally:
        s.close()


def test_connection_cap(tmp_path):
    s = Served(tmp_path, helper_max_connections="2")
    try:
        a, b = s.connect(), s.connect()
        assert a.call("hello")["ok"] and b.call("hello")["ok"]
        c = s.connect()
        assert c.at_eof()  # closed without a word: no slot
        a.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the slot frees once a's thread ends
            d = s.connect()
            try:
                d.send(protocol.encode({"id": 1, "cmd": "hello"}))
                reply = d.reply()
            except OSError:
                reply = None
            if reply:
                break
            time.sleep(0.05)
        assert reply["ok"]
    finally:
        s.close()


def test_unexpected_errors_are_internal_and_generic(tmp_path, caplog):
    def boom(ctx, req_id, cmd, args):
        raise RuntimeError("secret detail")

    s = Served(tmp_path, dispatch=boom)
    try:
        conn = s.connect()
        reply = conn.call("hello", req_id=3)
        assert reply["id"] == 3 and reply["error"]["code"] == protocol.INTERNAL
        assert "secret detail" not in json.dumps(reply)
        assert "secret detail" in caplog.text  # but it is in the log, with its traceback
        assert conn.call("hello")["error"]["code"] == protocol.INTERNAL  # still serving
    finally:
        s.close()


def test_handler_crash_is_internal(served):
    def broken(*args, **kwargs):
        raise RuntimeError("wg exploded")

    served.helper.runner.wg = broken
    conn = served.connect()
    assert conn.call("status")["error"]["code"] == protocol.INTERNAL
    assert conn.call("hello")["ok"]


def test_uid_not_allowed_in_process(tmp_path):
    s = Served(tmp_path, helper_allowed_uids="12345")
    try:
        conn = s.connect()
        # No request sent: the refusal comes first, then the server hangs up.
        reply = conn.reply()
        assert reply == {"id": None, "ok": False,
                         "error": {"code": protocol.FORBIDDEN, "message": "uid 0 may not use this helper"}}
        assert conn.at_eof()
        assert s.calls == []
    finally:
        s.close()


FORBIDDEN_CLIENT = r"""
import os, socket, sys
os.setgroups([])
os.setgid(%d)
os.setuid(%d)
assert os.getuid() == %d
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b"\n")
except BrokenPipeError:
    pass  # the server refused us before reading: its reply is still queued
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        # The server hangs up without reading our request; Linux then
        # reports a reset, but only after the queued reply has been read.
        break
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
""" % (NOBODY, NOBODY, NOBODY)


def test_uid_not_allowed_from_another_user(served):
    request = json.dumps({"id": 1, "cmd": "apply_peers", "args": {"add": [peer(key(1))]}})
    done = subprocess.run([sys.executable, "-I", "-c", FORBIDDEN_CLIENT, served.path, request],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    reply = json.loads(lines[0])
    assert reply["ok"] is False and reply["error"]["code"] == protocol.FORBIDDEN
    assert served.calls == []
    assert served.helper.runner.peers == {}
    assert served.connect().call("hello")["ok"]


def test_stale_socket_is_replaced(tmp_path):
    s = Served(tmp_path)
    path = s.path
    # Simulate a crash: the listener goes away, the file stays.
    s.server._listener.close()
    s.server._listener = None
    s.thread.join(5)
    assert os.path.exists(path)
    again = Server(s.settings, s.helper.ctx)
    again.bind()
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        again.close()
        s.close()
    assert not os.path.exists(path)


def test_refuses_to_steal_a_live_socket(served):
    other = Server(served.settings, served.helper.ctx)
    with pytest.raises(OSError, match="another helper"):
        other.bind()
    assert served.connect().call("hello")["ok"]


def test_refuses_to_replace_a_non_socket(tmp_path):
    d = tempfile.mkdtemp(prefix="omsrv-")
    try:
        path = os.path.join(d, "h.sock")
        open(path, "w").close()
        server = Server(settings(helper_socket=path), Helper(tmp_path).ctx)
        with pytest.raises(OSError, match="not a socket"):
            server.bind()
        assert os.path.isfile(path)
    finally:
        shutil.rmtree(d)


def test_close_removes_the_socket_and_ends_connections(tmp_path):
    s = Served(tmp_path)
    conn = s.connect()
    assert conn.call("hello")["ok"]
    s.close()
    assert not os.path.exists(s.path)
    assert conn.at_eof()


def test_a_request_whose_client_hung_up_is_not_run(tmp_path):
    """A stopped helper reads requests the app has given up on: they must not run."""
    ran = []

    def dispatch(ctx, req_id, cmd, args):
        ran.append(cmd)
        return protocol.ok(req_id, {})
    served = Served(tmp_path, dispatch=dispatch)
    try:
        gone, server_side = socket.socketpair()
        gone.sendall(protocol.encode({"id": 1, "cmd": "apply_peers", "args": {}}))
        gone.close()
        served.server._handle(server_side)
        server_side.close()
        assert ran == []

        half, server_side = socket.socketpair()  # only done sending: still answered
        half.sendall(protocol.encode({"id": 2, "cmd": "hello", "args": {}}))
        half.shutdown(socket.SHUT_WR)
        served.server._handle(server_side)
        server_side.close()
        assert ran == ["hello"] and json.loads(half.makefile("rb").readline())["id"] == 2
        half.close()
    finally:
        served.close()
