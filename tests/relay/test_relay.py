"""The relay's shared parts and the `orbmesh-wg relay` command as a process."""
import ast
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app import relay as relay_module
from app.cli import main as cli_main
from app.relay import Backoff, Relay, Stats, parse_listen, tls_context
from tests.relay.fakes import (TOKEN, FakeTunnelServer, FakeWsServer, UdpPeer, self_signed, wait_for,
                                    wg_datagram)

ROOT = Path(__file__).resolve().parents[2]
COMMAND = Path(sys.executable).parent / "orbmesh-wg"
STATUS = re.compile(r"\Arelay (ws|http) up=(\d+)/(\d+) down=(\d+)/(\d+) dropped=(\d+) "
                    r"reconnects=(\d+) connected=(yes|no)\Z")


def test_status_line_format():
    stats = Stats()
    assert stats.line("ws") == "relay ws up=0/0 down=0/0 dropped=0 reconnects=0 connected=no"
    stats.up(3, 300)
    stats.down(2, 128)
    stats.drop(4)
    stats.reconnect()
    stats.set_connected(True)
    line = stats.line("http")
    assert line == "relay http up=3/300 down=2/128 dropped=4 reconnects=1 connected=yes"
    assert STATUS.match(line)


def test_status_line_is_documented():
    assert "relay TRANSPORT up=PKTS/BYTES down=PKTS/BYTES dropped=N reconnects=N connected=yes|no" \
        in relay_module.__doc__


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


def test_listen_on_ipv6_loopback():
    relay = Relay("ws", "http://127.0.0.1:9", TOKEN, ("::1", 0))
    try:
        assert relay.local.address[0] == "::1"
    finally:
        relay.stop()


def test_backoff_doubles_to_the_cap_with_jitter():
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(12)]
    bases = [min(30.0, 0.5 * 2 ** i) for i in range(12)]
    for delay, base in zip(delays, bases):
        assert 0.75 * base <= delay <= 1.25 * base
    backoff.reset()
    assert backoff.next_delay() <= 0.625


@pytest.mark.parametrize("argv, message", [
    (["--url", "ftp://x:1"], "--url must be"),
    (["--listen", "localhost:5"], "--listen must be"),
    (["--session", "bad name"], "--session must match"),
    (["--http-senders", "0"], "--http-senders must be"),
    (["--insecure", "--ca-file", "x.pem"], "not allowed with"),
])
def test_bad_options(argv, message, capsys):
    base = {"--transport": "http", "--url": "http://127.0.0.1:1", "--listen": "127.0.0.1:0"}
    for i in range(0, len(argv) - 1, 2):
        base.pop(argv[i], None)
    args = ["relay"] + [x for pair in base.items() for x in pair] + argv
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_token_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("ORBMESH_RELAY_TOKEN", raising=False)
    code = cli_main(["relay", "--transport", "ws", "--url", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"])
    assert code == 2
    assert "ORBMESH_RELAY_TOKEN" in capsys.readouterr().err


def test_help_names_the_token_variable(capsys):
    with pytest.raises(SystemExit):
        cli_main(["relay", "--help"])
    assert "ORBMESH_RELAY_TOKEN" in capsys.readouterr().out


def test_relay_modules_do_not_import_flask():
    for name in ("relay.py", "relay_ws.py", "relay_http.py", "framing.py"):
        tree = ast.parse((ROOT / "app" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("flask", "flask_sock", "werkzeug") for n in names), name


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


def echo_once(relay, attempts=50):
    """Send until an echo comes back (the first may go before the relay is connected)."""
    peer = UdpPeer(relay.local.address)
    try:
        for i in range(attempts):
            peer.send(wg_datagram(i))
            echo = peer.receive_all(1, timeout=0.2)
            if echo:
                return echo[0]
        return None
    finally:
        peer.close()


@pytest.mark.parametrize("transport", ["ws", "http"])
@pytest.mark.parametrize("trust", ["ca-file", "insecure"])
def test_tls(transport, trust, certificate):
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = (FakeWsServer if transport == "ws" else FakeTunnelServer)(tls=server_tls)
    context = tls_context(ca_file=str(cert)) if trust == "ca-file" else tls_context(insecure=True)
    relay = Relay(transport, server.url, TOKEN, ("127.0.0.1", 0), ssl_context=context,
                  backoff_first=0.05).start()
    try:
        assert server.url.startswith("https://")
        assert echo_once(relay)[:4] == b"\x04\x00\x00\x00"
    finally:
        relay.stop()
        server.stop()


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_tls_unknown_ca_is_refused(transport, certificate):
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = (FakeWsServer if transport == "ws" else FakeTunnelServer)(tls=server_tls)
    relay = Relay(transport, server.url, TOKEN, ("127.0.0.1", 0), ssl_context=tls_context(),
                  backoff_first=0.05).start()
    try:
        wait_for(lambda: relay.stats.reconnects >= 2, what="retries")
        assert not relay.stats.connected and relay.fatal is None
    finally:
        relay.stop()
        server.stop()


def test_insecure_warns(capsys, monkeypatch):
    monkeypatch.setenv("ORBMESH_RELAY_TOKEN", TOKEN)
    monkeypatch.setattr(relay_module.Relay, "start", lambda self: self.stopping.set() or self)
    code = cli_main(["relay", "--transport", "http", "--url", "https://127.0.0.1:1", "--listen", "127.0.0.1:0",
                     "--insecure"])
    assert code == 0
    assert "WARNING: --insecure" in capsys.readouterr().err


class RelayProcess:
    """`orbmesh-wg relay` as a subprocess; stdout and stderr read by threads."""

    def __init__(self, *args, token=TOKEN):
        env = dict(os.environ, ORBMESH_RELAY_TOKEN=token)
        self.proc = subprocess.Popen([str(COMMAND), "relay", "--listen", "127.0.0.1:0", *args],
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


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_process_status_on_sigusr1_and_clean_stop(transport):
    server = FakeWsServer() if transport == "ws" else FakeTunnelServer()
    relay = RelayProcess("--transport", transport, "--url", server.url, "--status-interval", "0")
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


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_process_bad_token_exits_2(transport):
    server = FakeWsServer() if transport == "ws" else FakeTunnelServer()
    relay = RelayProcess("--transport", transport, "--url", server.url, "--status-interval", "0",
                         token="not-the-token")
    try:
        assert relay.finish(timeout=20) == 2
        relay.next_err(r"orbmesh-wg relay: .*401")
    finally:
        relay.kill()
        server.stop()
    assert "not-the-token" not in "\n".join(relay.err_lines + list(relay.err.queue))
