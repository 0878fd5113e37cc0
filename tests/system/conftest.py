"""The booted node (tests/system/node.py), shared by every check of a module: one install, one topology.

Needs root, debootstrap and systemd-nspawn (scripts/bootstrap installs them):
skipped without, failed under CI (tests/need.py).
"""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.internet import Internet
from tests.e2e.netns import creator, veth
from tests.need import missing, need

from .node import CLIENT_ADDR, NODE_ADDR, REPO, Lab, Node, rootfs, upgrade_base, wheels


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        missing("the system test needs root (debootstrap, systemd-nspawn, network namespaces)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "wireguard-go", "wg", "ip", "curl", "ping", "dig"):
        need(tool)
    log_dir = tmp_path_factory.mktemp("system")
    started = time.monotonic()

    def log(text):
        with open(log_dir / "lab.log", "a") as handle:
            handle.write("[%6.1f s] %s\n" % (time.monotonic() - started, text))

    made, run_dir, base_tree = [], None, None
    node = lab = internet = None
    try:
        cached = rootfs(log)
        binds = {"/srv/orbmesh": REPO, "/srv/wheels": wheels(REPO, log)}
        base_commit, base_tree = upgrade_base(log)
        if base_tree is not None:
            binds.update({"/srv/orbmesh-base": base_tree, "/srv/wheels-base": wheels(base_tree, log)})
        run_dir = Path(tempfile.mkdtemp(prefix="omsys-", dir="/var/tmp"))
        subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(run_dir / "root")], check=True)
        netns = creator(made)
        node_ns, client_ns = netns("sysnode"), netns("syscli")
        veth(client_ns, CLIENT_ADDR + "/24", node_ns, NODE_ADDR + "/24")
        # A production node: an uplink into a simulated internet (v4 and v6) that it NATs clients out of,
        # and IPv6 forwarding switched on by the operator (nspawn keeps the node's /proc/sys/net read-only,
        # so it is set here, in the node's namespace, before the boot).
        internet = Internet(netns, node_ns, ipv6=True)
        node_ns.run("sysctl", "-w", "net.ipv6.conf.all.forwarding=1")
        node = Node(run_dir / "root", node_ns, binds, log_dir)
        node.boot()
        log("booted a fresh Debian in %.1f s" % (time.monotonic() - node.started))
        lab = Lab(node, client_ns, log)
        lab.internet = internet
        lab.base_commit = base_commit
        # As an operator: install, say where apps reach WireGuard, reboot.
        lab.first_install = lab.install("/srv/orbmesh", "/srv/wheels", "--server-name", NODE_ADDR,
                                        "--ports", ",".join(map(str, Lab.API_PORTS)))
        node.set_env(PUBLIC_HOST=NODE_ADDR, NAT_UPLINK=internet.uplink)
        node.poweroff()
        node.boot()
        log("booted the installed node in %.1f s" % (time.monotonic() - node.started))
        yield lab
    finally:
        for close in reversed(lab.closers if lab is not None else []):
            close()
        if node is not None:
            node.poweroff()
        if internet is not None:
            internet.close()
        for ns in reversed(made):
            ns.delete()
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        if base_tree is not None:
            shutil.rmtree(base_tree, ignore_errors=True)
        log("done")
