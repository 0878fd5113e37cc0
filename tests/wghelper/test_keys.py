"""The helper's keys (wghelper/keys.py): made once, 0600, only ever a path in an argv."""
import base64
import os
import stat

import pytest

from wghelper import keys
from wghelper.argv import Commands
from wghelper.errors import ConfigError
from wghelper.handlers import Context
from wghelper.interface import Interface
from wghelper.writer import Writer

from .fakes import FAKE_IF, SERVER_PUBLIC, FakeRunner, Helper, key, peer

IF = FAKE_IF
K1 = key(1)


# --- the server key -----------------------------------------------------------

def test_server_key_is_created_once_and_never_in_argv(tmp_path):
    state = tmp_path / "state"
    runner = FakeRunner()
    path, public = keys.ensure_key(str(state), Commands(runner))
    assert public == SERVER_PUBLIC
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    private = open(path).read().strip()
    raw = base64.b64decode(private, validate=True)
    assert len(raw) == 32 and raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
    assert runner.calls == [["wg", "pubkey"]]
    assert runner.stdins == [(["wg", "pubkey"], private + "\n")]

    # Restart: the same key, no new file.
    again, _ = keys.ensure_key(str(state), Commands(runner))
    assert again == path and open(path).read().strip() == private
    assert os.listdir(state) == ["server.key"]

    # Bring the interface up and change peers: the key is only ever a path.
    h = Helper(tmp_path)
    h.runner, h.cmd = runner, Commands(runner)
    h.iface = Interface(h.settings, h.cmd, path, socket_dir=str(tmp_path))
    h.writer = Writer(h.cmd, IF)
    h.ctx = Context(h.settings, h.cmd, h.iface, h.writer, public)
    h.iface.up()
    h.writer.start()
    h.result("apply_peers", {"add": [peer(K1)]})
    h.result("status")
    h.writer.stop()
    assert ["wg", "set", IF, "listen-port", "51820", "private-key", path] in runner.calls
    for argv in runner.calls:
        assert not any(private in arg for arg in argv), argv


def test_server_key_refuses_garbage(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "server.key").write_text("not a key\n")
    with pytest.raises(ConfigError):
        keys.ensure_key(str(state), Commands(FakeRunner()))


def test_server_key_tightens_loose_permissions(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    keyfile = state / "server.key"
    keyfile.write_text(keys.generate_private_key() + "\n")
    keyfile.chmod(0o644)
    keys.ensure_key(str(state), Commands(FakeRunner()))
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


# --- the node's unique-local IPv6 pool ---------------------------------------

def test_ula_is_made_once_and_kept(tmp_path, monkeypatch):
    state = tmp_path / "state"
    pool6 = keys.ensure_ula(str(state))
    # RFC 4193: fd00::/8, a 40-bit global ID, subnet 0, a /64.
    assert pool6.prefixlen == 64 and pool6.network_address.packed[0] == 0xfd
    assert pool6.network_address.packed[6:8] == b"\0\0"
    path = state / keys.ULA_FILE
    assert path.read_text() == str(pool6) + "\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.listdir(state) == [keys.ULA_FILE]
    # Later starts read it back and never draw again.
    monkeypatch.setattr(os, "urandom", lambda n: pytest.fail("drew a new global ID"))
    assert keys.ensure_ula(str(state)) == pool6


def test_ula_global_ids_are_random(tmp_path):
    made = {keys.ensure_ula(str(tmp_path / str(n))) for n in range(8)}
    assert len(made) == 8


@pytest.mark.parametrize("text", ["", "nope", "fd00:1:2::/48", "2001:db8::/64", "fd00:1:2:3::1/64", "10.8.0.0/16"])
def test_ula_file_must_hold_a_unique_local_64(tmp_path, text):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / keys.ULA_FILE).write_text(text + "\n")
    with pytest.raises(ConfigError, match="unique-local /64"):
        keys.ensure_ula(str(state))
    (state / keys.ULA_FILE).write_text("fd12:3456:789a::/64\n")  # the control: a good file is taken
    assert str(keys.ensure_ula(str(state))) == "fd12:3456:789a::/64"
