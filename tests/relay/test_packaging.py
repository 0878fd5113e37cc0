"""The relay installs alone (relay/pyproject.toml): a wheel of orbmesh_relay needing only `websockets`,
whose orbmesh-relay command runs in a virtualenv that holds nothing of the server."""
import json
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.relay.fakes import TOKEN, FakeNode, FakeTunnelServer, UdpPeer, wg_datagram

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtualenv with the relay's wheel and websockets' installed from a local wheelhouse only."""
    work = tmp_path_factory.mktemp("relay-alone")
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # As a user builds it; the build backend (setuptools, wheel) comes from the configured index.
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(wheels), str(ROOT / "relay")], check=True, timeout=600)
    subprocess.run(pip + ["download", "--no-deps", "-d", str(wheels), "websockets>=14"], check=True, timeout=600)
    venv.EnvBuilder(with_pip=True).create(work / "venv")
    python = work / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-index",
                    "--find-links", str(wheels), "orbmesh-relay"], check=True, timeout=600)
    return work, python


def test_the_wheel_holds_the_relay_and_needs_only_websockets(installed):
    work, python = installed
    wheel = next((work / "wheels").glob("orbmesh_relay-*.whl"))
    listing = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True,
                             check=True).stdout
    modules = {line.split()[0] for line in listing.splitlines()[1:] if line.split()[0].endswith(".py")}
    assert modules == {"orbmesh_relay/%s" % p.name for p in (ROOT / "orbmesh_relay").glob("*.py")}
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m, json; "
                           "print(json.dumps([m.requires('orbmesh-relay'), sorted(d.metadata['Name'].lower() "
                           "for d in m.distributions())]))"], capture_output=True, text=True, check=True,
                          cwd=str(work))  # not the checkout: its egg-info would count
    requires, installed_names = json.loads(done.stdout)
    assert requires == ["websockets>=14"]
    assert set(installed_names) - {"pip", "setuptools"} == {"orbmesh-relay", "websockets"}


def test_the_installed_command_runs_without_the_server(installed):
    work, python = installed
    command = work / "venv" / "bin" / "orbmesh-relay"
    helped = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: orbmesh-relay ")
    # Control: the server's code is not there to be imported by accident.
    for module in ("flask", "app", "wghelper", "gevent"):
        missing = subprocess.run([str(python), "-c", "import " + module], capture_output=True, cwd=str(work))
        assert missing.returncode != 0, module
    # And it relays: --transport auto over UDP against a fake node, in the portable mode.
    node, api = FakeNode(), FakeTunnelServer()
    api.probe = node
    env = dict(os.environ, ORBMESH_RELAY_TOKEN=TOKEN, ORBMESH_RELAY_PORTABLE="1")
    proc = subprocess.Popen([str(command), "--transport", "auto", "--url", api.url, "--endpoint", node.endpoint,
                             "--listen", "127.0.0.1:0", "--status-interval", "0"], env=env, cwd=str(work),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peer = None
    try:
        line = proc.stderr.readline()
        assert "listening on udp 127.0.0.1 port" in line, line
        peer = UdpPeer(("127.0.0.1", int(line.split("port ")[1].split(",")[0])))
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0 and out.startswith("relay udp ")
    finally:
        if peer:
            peer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        api.stop()
        node.stop()
