"""What a process can reach from where it runs: one JSON line on stdout.

tests/system/test_node.py runs this inside the node twice: as a unit made
from orbmesh-wghelper.service with only its ExecStart swapped for this
script (the helper's exact sandbox: capabilities, seccomp, mounts,
environment), and as plain root (the control).  Each probe is "ok" or the
error it met.  Writes put back the value just read, so nothing changes even
where a write succeeds.  Python's standard library only: it runs on the
node's /usr/bin/python3.
"""
import json
import os
import socket
import subprocess


def _rewrite(path):
    with open(path) as handle:
        value = handle.read()
    with open(path, "w") as handle:
        handle.write(value)


def _connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(path)
    finally:
        sock.close()


def _read(path):
    with open(path, "rb") as handle:
        handle.read(1)


def _systemctl():
    done = subprocess.run(["systemctl", "show", "-p", "Version", "--value"], capture_output=True, text=True,
                          timeout=20)
    if done.returncode != 0:
        raise OSError(done.stderr.strip() or "exit %d" % done.returncode)


def _no_secrets():
    leaked = [k for k in ("ORBMESH_JWT_SECRET", "ORBMESH_API_KEYS") if k in os.environ]
    if leaked:
        raise AssertionError("in the environment: %s" % leaked)


PROBES = {
    "write kernel.core_pattern": lambda: _rewrite("/proc/sys/kernel/core_pattern"),
    "write net.ipv4.ip_forward": lambda: _rewrite("/proc/sys/net/ipv4/ip_forward"),
    "write net.ipv4.conf.lo.forwarding": lambda: _rewrite("/proc/sys/net/ipv4/conf/lo/forwarding"),
    "connect /run/systemd/private": lambda: _connect("/run/systemd/private"),
    "connect /run/dbus/system_bus_socket": lambda: _connect("/run/dbus/system_bus_socket"),
    "run systemctl": _systemctl,
    "read /etc/orbmesh/tls/key.pem": lambda: _read("/etc/orbmesh/tls/key.pem"),
    "read /etc/shadow": lambda: _read("/etc/shadow"),
    "no app secrets in the environment": _no_secrets,
}


def main():
    found = {}
    for name, probe in PROBES.items():
        try:
            probe()
            found[name] = "ok"
        except Exception as exc:  # every failure is the answer
            found[name] = "%s: %s" % (type(exc).__name__, exc)
    print(json.dumps(found, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
