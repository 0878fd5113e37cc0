"""orbmesh-wg token: mints a device token the app accepts, never with a placeholder secret."""


def test_cli_mints_a_token_the_app_accepts(app, monkeypatch, capsys):
    from app.auth import verify_device_token
    from app.cli import main
    monkeypatch.setenv("ORBMESH_JWT_SECRET", app.config["JWT_SECRET"])
    assert main(["token", "--user", "u-7", "--device", "d-9", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify_device_token(token, app.config) == ("u-7", "d-9")


def test_cli_refuses_placeholder_secret(monkeypatch, capsys):
    from app.cli import main
    monkeypatch.setenv("ORBMESH_JWT_SECRET", "changeme")
    assert main(["token", "--user", "u", "--device", "d"]) == 2
    captured = capsys.readouterr()
    assert "JWT_SECRET" in captured.err and captured.out == ""


def test_cli_prints_the_bridge_user_an_exit_scopes_a_key_to(monkeypatch, capsys, tmp_path):
    from app import cli
    from app.bridges import bridge_user
    from tests.conftest import BRIDGE_KEY, FakeHelper
    monkeypatch.setenv("ORBMESH_HELPER_SOCKET", str(tmp_path / "nothing-here.sock"))
    assert cli.main(["bridge-user"]) == 2  # no helper: a message, no traceback
    assert "unavailable" in capsys.readouterr().err
    monkeypatch.setattr(cli, "HelperClient", lambda path, timeout: FakeHelper())
    assert cli.main(["bridge-user"]) == 0
    assert capsys.readouterr().out.strip() == bridge_user(BRIDGE_KEY)
