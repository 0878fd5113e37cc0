"""The orbmesh-relay command, and `orbmesh-wg relay` that runs the same code,
in-process and as processes against fake servers."""
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.ops.cli import main as wg_main
from orbmesh_relay import cli
from orbmesh_relay import relay as relay_module
from orbmesh_relay.cli import parse_listen
from tests.relay.fakes import TOKEN, FakeNode, FakeTunnelServer, FakeWsServer, UdpPeer, wait_for, wg_datagram

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STATUS = re.compile(r"\Arelay (ws|http|udp|none) up=(\d+)/(\d+) down=(\d+)/(\d+) dropped=(\d+) "
                    r"reconnects=(\d+) connected=(yes|no) rtt=(-|[\d.]+ms) switches=(\d+)\Z")

# Both commands, in-process: (name in messages, how to call it).
ENTRY_POINTS = {
    "orbmesh-relay": cli.main,
    "orbmesh-wg relay": lambda argv: wg_main(["relay"] + argv),
}
# Both commands as installed console scripts.
COMMANDS = {
    "orbmesh-relay": [str(BIN / "orbmesh-relay")],
    "orbmesh-wg relay": [str(BIN / "orbmesh-wg"), "relay"],
}


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:51820", ("127.0.0.1", 51820)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:51820", ("::1", 51820)),
    ("[2001:db8::7]:9", ("2001:db8::7", 9)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["localhost:1", "::1:5", "127.0.0.1", "1.2.3.4:70000", "[::1]", "300.1.1.1:5",
                                  "[zz::1]:5", "127.0.0.1:5 "])
def test_parse_listen_refuses(text):
    with pytest.raises(ValueError):
        parse_listen(text)


@pytest.mark.parametrize("command", ENTRY_POINTS)
@pytest.mark.parametrize("argv, message", [
    (["--url", "ftp://x:1"], "--url must be"),
    (["--listen", "localhost:5"], "--listen must be"),
    (["--session", "bad name"], "--session must match"),
    (["--http-senders", "0"], "--http-senders must be"),
    (["--insecure", "--ca-file", "x.pem"], "not allowed with"),
    (["--endpoint", "host:x"], "--endpoint must be"),
    (["--transport", "quic"], "invalid choice: 'quic'"),
])
def test_bad_options(command, argv, message, capsys):
    base = {"--transport": "http", "--url": "http://127.0.0.1:1", "--listen": "127.0.0.1:0"}
    for i in range(0, len(argv) - 1, 2):
        base.pop(argv[i], None)
    args = [x for pair in base.items() for x in pair] + argv
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[command](args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "%s: error:" % command in err


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_missing_token_is_refused(command, monkeypatch, capsys):
    monkeypatch.delenv("ORBMESH_RELAY_TOKEN", raising=False)
    code = ENTRY_POINTS[command](["--transport", "ws", "--url", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"])
    assert code == 2
    assert capsys.readouterr().err == "%s: no token: pass --token or set ORBMESH_RELAY_TOKEN\n" % command


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_help_names_the_token_variable(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[command](["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: %s " % command)
    assert "ORBMESH_RELAY_TOKEN" in out


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_insecure_warns(command, capsys, monkeypatch):
    monkeypatch.setenv("ORBMESH_RELAY_TOKEN", TOKEN)
    monkeypatch.setattr(relay_module.Relay, "start", lambda self: self.stopping.set() or self)
    code = ENTRY_POINTS[command](["--transport", "http", "--url", "https://127.0.0.1:1",
                                  "--listen", "127.0.0.1:0", "--insecure"])
    assert code == 0
    assert "%s: WARNING: --insecure" % command in capsys.readouterr().err


@pytest.mark.parametrize("command, prefix", [("orbmesh-relay", "orbmesh-relay"), ("orbmesh-wg relay", "orbmesh-wg")])
def test_listen_address_in_use_exits_2(command, prefix, capsys, monkeypatch):
    monkeypatch.setenv("ORBMESH_RELAY_TOKEN", TOKEN)
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        code = ENTRY_POINTS[command](["--transport", "ws", "--url", "http://127.0.0.1:1",
                                      "--listen", "127.0.0.1:%d" % taken.getsockname()[1]])
    finally:
        taken.close()
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("%s: " % prefix) and "in use" in err
    assert TOKEN not in err


def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "orbmesh_relay", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: orbmesh-relay ")
    refused = subprocess.run([sys.executable, "-m", "orbmesh_relay", "--transport", "quic"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "invalid choice: 'quic'" in refused.stderr


class RelayProcess:
    """The relay command as a subprocess; stdout and stderr read by threads."""

    def __init__(self, *args, command="orbmesh-relay", token=TOKEN):
        env = dict(os.environ, ORBMESH_RELAY_TOKEN=token)
        self.proc = subprocess.Popen([*COMMANDS[command], "--listen", "127.0.0.1:0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)
        self.out = queue.Queue()
        self.err = queue.Queue()
        self.err_lines = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.put(line.rstrip("\n"))

    def next_err(self, pattern, timeout=10):
        regex = re.compile(pattern)
        while True:
            line = self.err.get(timeout=timeout)
            self.err_lines.append(line)
            match = regex.search(line)
            if match:
                return match

    def next_status(self, timeout=10):
        line = self.out.get(timeout=timeout)
        match = STATUS.match(line)
        assert match, line
        return match

    def address(self):
        match = self.next_err(r"listening on udp (\S+) port (\d+)")
        return match.group(1), int(match.group(2))

    def finish(self, timeout=10):
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("transport", ["ws", "http"])
def test_process_status_on_sigusr1_and_clean_stop(transport, command):
    server = FakeWsServer() if transport == "ws" else FakeTunnelServer()
    relay = RelayProcess("--transport", transport, "--url", server.url, "--status-interval", "0", command=command)
    peer = None
    try:
        peer = UdpPeer(relay.address())
        # Until the relay is connected a datagram may be dropped: resend (bounded).
        echo = []
        for i in range(50):
            peer.send(wg_datagram(i))
            echo = peer.receive_all(1, timeout=0.2)
            if echo:
                break
        assert echo
        relay.proc.send_signal(signal.SIGUSR1)
        status = relay.next_status()
        assert status.group(1) == transport
        assert int(status.group(2)) >= 1 and int(status.group(4)) >= 1
        assert status.group(8) == "yes"
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.finish() == 0
        assert relay.next_status().group(1) == transport  # the last word on stop
    finally:
        if peer:
            peer.close()
        relay.kill()
        server.stop()
    assert TOKEN not in "\n".join(relay.err_lines + list(relay.err.queue))


def test_process_status_interval():
    server = FakeWsServer()
    relay = RelayProcess("--transport", "ws", "--url", server.url, "--status-interval", "0.2")
    try:
        assert relay.next_status().group(1) == "ws"
        assert relay.next_status().group(1) == "ws"
        relay.proc.send_signal(signal.SIGINT)
        assert relay.finish() == 0
    finally:
        relay.kill()
        server.stop()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("transport", ["ws", "http"])
def test_process_bad_token_exits_2(transport, command):
    server = FakeWsServer() if transport == "ws" else FakeTunnelServer()
    relay = RelayProcess("--transport", transport, "--url", server.url, "--status-interval", "0",
                         command=command, token="not-the-token")
    try:
        assert relay.finish(timeout=20) == 2
        relay.next_err(r"%s: .*401" % command)
    finally:
        relay.kill()
        server.stop()
    assert "not-the-token" not in "\n".join(relay.err_lines + list(relay.err.queue))


@pytest.mark.parametrize("transport", ["udp", "auto"])
def test_process_udp_and_auto_with_a_status_file(transport, tmp_path):
    node = FakeNode()
    api = FakeTunnelServer()
    api.probe = node
    path = tmp_path / "status.json"
    relay = RelayProcess("--transport", transport, "--url", api.url, "--endpoint", node.endpoint,
                         "--status-interval", "0", "--status-file", str(path))
    peer = None
    try:
        peer = UdpPeer(relay.address())
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]
        relay.proc.send_signal(signal.SIGUSR1)
        status = relay.next_status()
        assert status.group(1) == "udp" and status.group(8) == "yes"
        assert status.group(10) == ("1" if transport == "auto" else "0")  # auto's first choice is a switch
        written = wait_for(lambda: path.exists() and json.loads(path.read_text()), what="the status file")
        assert written["mode"] == transport and written["transport"] == "udp"
        if transport == "auto":
            relay.next_err(r"switch none -> udp: first answer from the node came over udp")
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.finish() == 0
    finally:
        if peer:
            peer.close()
        relay.kill()
        api.stop()
        node.stop()
    assert TOKEN not in "\n".join(relay.err_lines + list(relay.err.queue)) + path.read_text()
