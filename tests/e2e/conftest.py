"""End-to-end fixtures: namespaces that are always deleted, leak checks.

Without root or the WireGuard tools these tests are skipped, except under
CI (CI set and not "false"/"0"), where a missing requirement is a failure:
a CI run that silently skips its end-to-end tests proves nothing.
"""
import os
import shutil
import socket
import subprocess

import pytest

from tests.need import missing, need

from .netns import Netns, veth
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack

TOOLS = ("ip", "wg", "wireguard-go")


def requirements(*tools):
    """Root and the WireGuard tools (plus `tools`): skipped without them, failed under CI (tests/need.py)."""
    if os.geteuid() != 0:
        missing("end-to-end tests need root (network namespaces, tun devices)")
    for tool in TOOLS + tools:
        need(tool)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _e2e_requirements():
    requirements()


def wireguard_go_in(inodes):
    """Pids of wireguard-go processes living in one of the given namespaces."""
    out = subprocess.run(["pgrep", "-x", "wireguard-go"], capture_output=True, text=True)
    found = []
    for pid in (int(p) for p in out.stdout.split()):
        try:
            if os.stat("/proc/%d/ns/net" % pid).st_ino in inodes:
                found.append(pid)
        except FileNotFoundError:
            pass
    return found


WG_SOCKET_DIR = "/var/run/wireguard"


def _wireguard_sockets():
    try:
        return {name for name in os.listdir(WG_SOCKET_DIR) if name.endswith(".sock")}
    except FileNotFoundError:
        return set()


def _remove_dead_sockets(names):
    """wireguard-go killed with its namespace leaves its control socket behind.

    Only sockets that appeared during this test are looked at, and only
    dead ones (nothing listening) are removed.
    """
    for name in names:
        path = os.path.join(WG_SOCKET_DIR, name)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        except OSError:
            pass
        finally:
            probe.close()


@pytest.fixture
def netns():
    """Factory: netns("tag") -> a created Netns, deleted after the test.

    Afterwards it checks that the namespaces are gone and that no
    wireguard-go survived in any of them; other tests running in parallel
    on the same machine are left alone (we look only at our namespaces).
    """
    made = []
    sockets_before = _wireguard_sockets()

    def make(tag="t"):
        ns = Netns(tag)
        made.append(ns)
        ns.create()
        return ns

    yield make

    inodes = {ns.inode for ns in made if ns.inode is not None}
    errors = []
    for ns in reversed(made):
        try:
            ns.delete()
        except Exception as exc:  # keep deleting the others
            errors.append(exc)
    _remove_dead_sockets(_wireguard_sockets() - sockets_before)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [ns.name for ns in made if ns.name in listed.split()]
    leaked = wireguard_go_in(inodes)
    if errors:
        raise errors[0]
    assert not left, "namespaces left behind: %s" % left
    assert not leaked, "wireguard-go left running: %s" % leaked


@pytest.fixture
def stack_env():
    """Extra ORBMESH_* settings for the stack; override in a test module."""
    return {}


@pytest.fixture
def stack_workers():
    """gunicorn workers for the stack; override in a test module."""
    return 2


@pytest.fixture
def stack(netns, tmp_path, stack_env, stack_workers):
    """Helper + gunicorn in a "server" namespace, reached from a "client" one."""
    server, client = netns("srv"), netns("cli")
    veth(server, SERVER_ADDR + "/24", client, CLIENT_ADDR + "/24")
    s = Stack(server, client, tmp_path, workers=stack_workers)
    s.env.update(stack_env)
    with s.running():
        yield s


@pytest.fixture
def internet(netns, stack):
    """The simulated internet behind the stack's server namespace (uplink veth)."""
    from .internet import Internet
    net = Internet(netns, stack.server)
    yield net
    net.close()
