"""orbmesh-wg token: mints a device token the app accepts, never with a placeholder secret.
orbmesh-wg dns-config: the Unbound config from the settings and the helper's hello."""
import os
import socket
import stat
import threading

import pytest

from wghelper import protocol


def test_cli_mints_a_token_the_app_accepts(app, monkeypatch, capsys):
    from app.api.auth import verify_device_token
    from app.ops.cli import main
    monkeypatch.setenv("ORBMESH_JWT_SECRET", app.config["JWT_SECRET"])
    assert main(["token", "--user", "u-7", "--device", "d-9", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify_device_token(token, app.config) == ("u-7", "d-9")


def test_cli_refuses_placeholder_secret(monkeypatch, capsys):
    from app.ops.cli import main
    monkeypatch.setenv("ORBMESH_JWT_SECRET", "changeme")
    assert main(["token", "--user", "u", "--device", "d"]) == 2
    captured = capsys.readouterr()
    assert "JWT_SECRET" in captured.err and captured.out == ""


# --- dns-config ---------------------------------------------------------------------

class HelloSocket:
    """A helper socket that answers each request with `reply` (a result dict, or an error dict)."""

    def __init__(self, path, result=None, error=None):
        self.result, self.error, self.commands = result, error, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as stream:
                line = protocol.read_frame(stream)
                if line is None:
                    continue
                request = protocol.decode(line)
                self.commands.append(request["cmd"])
                reply = ({"id": request["id"], "ok": False, "error": self.error} if self.error
                         else {"id": request["id"], "ok": True, "result": self.result})
                conn.sendall(protocol.encode(reply))

    def close(self):
        self.server.close()


@pytest.fixture
def dns_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ORBMESH_POOL", "10.66.0.0/16")
    monkeypatch.setenv("ORBMESH_DNS_UPSTREAM", "192.0.2.53, 198.51.100.53")
    monkeypatch.setenv("ORBMESH_HELPER_SOCKET", str(tmp_path / "helper.sock"))
    return tmp_path


def test_dns_config_renders_from_the_settings_and_the_helper_hello(dns_env, capsys):
    from app.ops.cli import main
    helper = HelloSocket(str(dns_env / "helper.sock"),
                         result={"public_key": "k", "pool": "10.66.0.0/16", "gateway": "10.66.0.1",
                                 "pool6": "fd00:66::/64", "gateway6": "fd00:66::1"})
    out = dns_env / "unbound.conf"
    try:
        assert main(["dns-config", "--output", str(out)]) == 0
    finally:
        helper.close()
    text = out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # Unbound reads it after dropping root
    assert helper.commands == ["hello"]
    assert "    interface: 10.66.0.1\n    interface: fd00:66::1\n" in text
    assert "access-control: 10.66.0.0/16 allow" in text and "access-control: fd00:66::/64 allow" in text
    assert "forward-addr: 192.0.2.53\n    forward-addr: 198.51.100.53\n" in text
    assert 'username: "unbound"' in text and capsys.readouterr().out == ""


def test_dns_config_without_the_helper_prints_the_ipv4_config(dns_env, capsys):
    from app.ops.cli import main
    assert main(["dns-config", "--no-helper", "--username", ""]) == 0
    text = capsys.readouterr().out
    assert "interface: 10.66.0.1\n" in text and "fd00" not in text and 'username: ""' in text


def test_dns_config_fails_when_the_helper_refuses_and_writes_nothing(dns_env, monkeypatch, capsys):
    from app.ops.cli import main
    helper = HelloSocket(str(dns_env / "helper.sock"),
                         error={"code": "FORBIDDEN", "message": "uid 0 may not use this helper"})
    out = dns_env / "unbound.conf"
    try:
        assert main(["dns-config", "--output", str(out)]) == 2
    finally:
        helper.close()
    err = capsys.readouterr().err
    assert "cannot ask the helper" in err and "uid 0 may not use this helper" in err
    assert not out.exists()
    # Control: the same command with the helper answering writes the file.
    helper = HelloSocket(str(dns_env / "helper2.sock"), result={"public_key": "k"})
    monkeypatch.setenv("ORBMESH_HELPER_SOCKET", str(dns_env / "helper2.sock"))
    try:
        assert main(["dns-config", "--output", str(out)]) == 0
    finally:
        helper.close()
    assert out.exists()


def test_dns_config_fails_when_the_helper_is_not_there(dns_env, capsys):
    from app.ops.cli import main
    assert main(["dns-config", "--wait", "0.2"]) == 2
    assert "helper is unavailable" in capsys.readouterr().err


@pytest.mark.parametrize("switch, code", [("on", 0), ("off", 1), ("", 0)])
def test_dns_config_check_enabled(dns_env, monkeypatch, switch, code):
    from app.ops.cli import main
    monkeypatch.setenv("ORBMESH_DNS_RESOLVER", switch)
    assert main(["dns-config", "--check-enabled"]) == code


def test_cli_prints_the_bridge_user_an_exit_scopes_a_key_to(monkeypatch, capsys, tmp_path):
    from app.bridge.bridges import bridge_user
    from app.ops import cli
    from tests.conftest import BRIDGE_KEY, FakeHelper
    monkeypatch.setenv("ORBMESH_HELPER_SOCKET", str(tmp_path / "nothing-here.sock"))
    assert cli.main(["bridge-user"]) == 2  # no helper: a message, no traceback
    assert "unavailable" in capsys.readouterr().err
    monkeypatch.setattr(cli, "HelperClient", lambda path, timeout: FakeHelper())
    assert cli.main(["bridge-user"]) == 0
    assert capsys.readouterr().out.strip() == bridge_user(BRIDGE_KEY)
