"""deploy/install.sh into a temporary root (--root DIR --no-venv): files, modes, idempotence.

Under --root it skips apt, the system user, chown and starting services, and
--no-venv skips building /opt/orbmesh/venv (slow); every file is still
rendered and placed, and units are enabled with `systemctl --root`.
"""
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.need import need

from .test_files import DEPLOY, nginx_test

INSTALL = DEPLOY / "install.sh"


def install(root, *args):
    need("openssl")
    need("systemctl")
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-venv"] + list(args),
                          capture_output=True, text=True, timeout=120)


def tree(root):
    """{path: (type, mode, mtime_ns, sha256 or link target)} for everything under root."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                found[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_mtime_ns,
                              hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def env_of(path):
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", path.read_text(), re.M))


@pytest.fixture
def installed(tmp_path):
    root = tmp_path / "root"
    first = install(root, "--ports", "8081,8082", "--wireguard", "wireguard-go")
    assert first.returncode == 0, first.stdout + first.stderr
    return root, first


def test_install_places_every_file(installed):
    root, first = installed
    etc = root / "etc"
    for path, mode in (("etc/orbmesh", 0o750), ("etc/orbmesh/tls", 0o700), ("etc/orbmesh/orbmesh.env", 0o640),
                       ("etc/orbmesh/tls/key.pem", 0o600), ("etc/orbmesh/tls/cert.pem", 0o644),
                       ("etc/orbmesh/deploy.conf", 0o640), ("var/lib/orbmesh", 0o750),
                       ("etc/nginx/sites-available/orbmesh.conf", 0o644),
                       ("etc/systemd/system/orbmesh-wghelper.service", 0o644),
                       ("etc/systemd/system/orbmesh-api@.service", 0o644),
                       ("etc/systemd/system/orbmesh.target", 0o644),
                       ("etc/systemd/system/orbmesh-unbound.service", 0o644),
                       ("etc/systemd/system/orbmesh-down.service", 0o644),
                       ("etc/systemd/system/orbmesh-wireguard-go@.service", 0o644),
                       ("etc/systemd/system/orbmesh-wghelper.service.d/backend.conf", 0o644),
                       ("opt/orbmesh/deploy/gunicorn.conf.py", 0o644), ("opt/orbmesh/deploy/install.sh", 0o755),
                       ("opt/orbmesh/docs/operations.md", 0o644)):
        assert stat.S_IMODE((root / path).stat().st_mode) == mode, path
    # The code goes into the venv as a package (not under --no-venv); no copy of it lies in /opt/orbmesh.
    assert sorted(p.name for p in (root / "opt/orbmesh").iterdir()) == ["README.md", "deploy", "docs"]
    backend = (etc / "systemd/system/orbmesh-wghelper.service.d/backend.conf").read_text()
    assert "Environment=ORBMESH_WG_BACKEND=external" in backend and "After=orbmesh-wireguard-go@wg0.service" in backend
    # Tunnel clients reach the API where nginx publishes it (the first listen address's port).
    assert "Environment=ORBMESH_CLIENT_API_PORT=8443" in backend
    assert os.readlink(etc / "nginx/sites-enabled/orbmesh.conf") == "/etc/nginx/sites-available/orbmesh.conf"
    wants = sorted(p.name for p in (etc / "systemd/system/orbmesh.target.wants").iterdir())
    assert wants == ["orbmesh-api@8081.service", "orbmesh-api@8082.service", "orbmesh-down.service",
                     "orbmesh-unbound.service",
                     "orbmesh-wghelper.service", "orbmesh-wireguard-go@wg0.service"]
    assert (etc / "systemd/system/multi-user.target.wants/orbmesh.target").is_symlink()
    assert not (root / "opt/orbmesh/venv").exists()
    assert not list(root.rglob("__pycache__")) and not list(root.rglob("tests"))

    env = env_of(etc / "orbmesh/orbmesh.env")
    assert len(env["ORBMESH_JWT_SECRET"]) >= 43 and len(env["ORBMESH_API_KEYS"]) >= 16
    assert env["ORBMESH_HELPER_SOCKET_GROUP"] == "orbmesh"
    assert env["ORBMESH_HELPER_ALLOWED_UIDS"] == "orbmesh,root"  # root: the resolver unit asks the helper
    assert env["ORBMESH_DB_PATH"] == "/var/lib/orbmesh/orbmesh.db"
    site = (etc / "nginx/sites-available/orbmesh.conf").read_text()
    assert "server 127.0.0.1:8081 " in site and "server 127.0.0.1:8082 " in site
    # It says what to configure next, and that it started nothing.
    for word in ("ORBMESH_PUBLIC_HOST", "ORBMESH_NAT_UPLINK", "--orbnet-allow", "--cert", "nothing started"):
        assert word in first.stdout, word


def test_second_run_changes_nothing(installed):
    root, _ = installed
    before = tree(root)
    second = install(root)  # no options: the choices come from /etc/orbmesh/deploy.conf
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing changed" in second.stdout
    assert tree(root) == before


def test_changed_choices_are_applied_and_secrets_kept(installed, tmp_path):
    root, _ = installed
    env_before = (root / "etc/orbmesh/orbmesh.env").read_bytes()
    key_before = (root / "etc/orbmesh/tls/key.pem").read_bytes()
    third = install(root, "--ports", "8081,8083", "--orbnet-allow", "198.51.100.7")
    assert third.returncode == 0, third.stdout + third.stderr
    site = (root / "etc/nginx/sites-available/orbmesh.conf").read_text()
    assert "allow 198.51.100.7;" in site and "8082" not in site and "server 127.0.0.1:8083 " in site
    wants = sorted(p.name for p in (root / "etc/systemd/system/orbmesh.target.wants").iterdir())
    assert wants == ["orbmesh-api@8081.service", "orbmesh-api@8083.service", "orbmesh-down.service",
                     "orbmesh-unbound.service",
                     "orbmesh-wghelper.service", "orbmesh-wireguard-go@wg0.service"]
    assert (root / "etc/orbmesh/orbmesh.env").read_bytes() == env_before
    assert (root / "etc/orbmesh/tls/key.pem").read_bytes() == key_before
    assert env_of(root / "etc/orbmesh/deploy.conf")["ORBNET_ALLOW"] == "198.51.100.7"
    # A given certificate replaces the self-signed one.
    cert_dir = tmp_path / "given"
    cert_dir.mkdir()
    from .test_files import make_cert
    cert, key = make_cert(cert_dir, "vpn.example.net")
    fourth = install(root, "--cert", str(cert), "--key", str(key))
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert (root / "etc/orbmesh/tls/cert.pem").read_bytes() == cert.read_bytes()
    assert stat.S_IMODE((root / "etc/orbmesh/tls/key.pem").stat().st_mode) == 0o600


def test_bad_choice_is_refused_before_anything_is_recorded(installed):
    root, _ = installed
    before = tree(root)
    bad = install(root, "--orbnet-allow", "1.2.3.4;allow all")
    assert bad.returncode != 0
    assert tree(root) == before


def test_installed_site_passes_nginx_t(installed, tmp_path):
    root, _ = installed
    site = (root / "etc/nginx/sites-available/orbmesh.conf").read_text()
    site = site.replace("/etc/orbmesh/tls/", str(root / "etc/orbmesh/tls") + "/")
    path = tmp_path / "site.conf"
    path.write_text(site)
    checked = nginx_test(tmp_path, path)
    assert checked.returncode == 0, checked.stderr


def test_self_signed_certificate_names_the_server(tmp_path):
    root = tmp_path / "root"
    result = install(root, "--ports", "8081", "--server-name", "192.0.2.1")
    assert result.returncode == 0, result.stdout + result.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(root / "etc/orbmesh/tls/cert.pem")],
                          check=True, capture_output=True, text=True).stdout
    assert "IP Address:192.0.2.1" in text


def test_destdir_works_like_root(tmp_path):
    need("openssl")
    root = tmp_path / "dest"
    env = dict(os.environ, DESTDIR=str(root))
    result = subprocess.run(["bash", str(INSTALL), "--no-venv", "--ports", "8081"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "etc/nginx/sites-available/orbmesh.conf").is_file()


def test_refuses_to_touch_the_system_without_root_or_privileges(tmp_path):
    if os.geteuid() == 0:
        setpriv = need("setpriv")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(INSTALL)]
    else:
        argv = ["bash", str(INSTALL)]
    env = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "run as root" in result.stderr


def unbound_config(root, tmp_path, **settings):
    """What the installed orbmesh-unbound.service renders before Unbound starts, from the settings install.sh wrote.

    Its ExecStartPre, run here with this checkout's virtualenv, the output under
    tmp_path and --no-helper for --wait (no helper runs here: no IPv6 gateway).
    """
    from .test_files import VENV_BIN, directives
    unit = (root / "etc/systemd/system/orbmesh-unbound.service").read_text()
    pre = directives(unit)[("Service", "ExecStartPre")][0]
    argv = shlex.split(pre.lstrip("+").replace("/opt/orbmesh/venv/bin/", str(VENV_BIN) + "/"))
    out = tmp_path / "unbound.conf"
    argv[argv.index("--output") + 1] = str(out)
    argv[argv.index("--wait"):argv.index("--wait") + 2] = ["--no-helper"]
    env_file = tmp_path / "orbmesh.env"
    env_file.write_text((root / "etc/orbmesh/orbmesh.env").read_text()
                        + "".join("ORBMESH_%s=%s\n" % item for item in settings.items()))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ORBMESH_CONFIG_FILE": str(env_file)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert directives(unit)[("Service", "ExecStart")][0].endswith(" -c /run/orbmesh-unbound/unbound.conf")
    return out


@pytest.mark.parametrize("settings", [{}, {"DNS_UPSTREAM": "9.9.9.9,2620:fe::fe", "DNS_DNSSEC": "off",
                                           "POOL": "10.66.0.0/16"}])
def test_installed_resolver_config_passes_unbound_checkconf(installed, tmp_path, settings):
    root, _ = installed
    checkconf = need("unbound-checkconf")
    out = unbound_config(root, tmp_path, **settings)
    text = out.read_text()
    result = subprocess.run([checkconf, str(out)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    gateway = "10.66.0.1" if settings else "10.8.0.1"
    assert "    interface: %s\n" % gateway in text and 'username: ""' in text
    assert ("forward-addr: 9.9.9.9" in text) == bool(settings)
    # Control: unbound-checkconf does read it.
    out.write_text(text.replace("interface: ", "interfaces: ", 1))
    assert subprocess.run([checkconf, str(out)], capture_output=True, text=True, timeout=30).returncode != 0


def test_kernel_wireguard_has_the_helper_make_the_link_and_drops_the_wireguard_go_unit(installed):
    root, _ = installed
    done = install(root, "--wireguard", "kernel")
    assert done.returncode == 0, done.stdout + done.stderr
    backend = (root / "etc/systemd/system/orbmesh-wghelper.service.d/backend.conf").read_text()
    assert "Environment=ORBMESH_WG_BACKEND=kernel" in backend and "wireguard-go@" not in backend
    wants = sorted(p.name for p in (root / "etc/systemd/system/orbmesh.target.wants").iterdir())
    assert not any(name.startswith("orbmesh-wireguard-go@") for name in wants), wants
    assert env_of(root / "etc/orbmesh/deploy.conf")["WIREGUARD"] == "kernel"
    # Kept: a later run without the option changes nothing.
    assert "nothing changed" in install(root).stdout


def test_the_wireguard_go_unit_follows_the_interface_name(tmp_path):
    root = tmp_path / "root"
    (root / "etc/orbmesh").mkdir(parents=True)
    (root / "etc/orbmesh/orbmesh.env").write_text("ORBMESH_JWT_SECRET=x\nORBMESH_INTERFACE=\"wg-main\"\n")
    done = install(root, "--ports", "8081", "--wireguard", "wireguard-go")
    assert done.returncode == 0, done.stdout + done.stderr
    unit = "orbmesh-wireguard-go@wg\\x2dmain.service"  # systemd-escape: %I is "wg-main" again
    assert (root / "etc/systemd/system/orbmesh.target.wants" / unit).is_symlink()
    assert "Wants=%s" % unit in (root / "etc/systemd/system/orbmesh-wghelper.service.d/backend.conf").read_text()


def test_an_older_layout_s_copied_code_goes(installed):
    """install.sh once copied app/, wghelper/ and a systemctl wrapper into /opt/orbmesh; gunicorn, whose working
    directory that is, would import the stale copy ahead of the venv's package."""
    root, _ = installed
    for stale in ("opt/orbmesh/app/__init__.py", "opt/orbmesh/wghelper/server.py", "opt/orbmesh/setup.cfg",
                  "opt/orbmesh/deploy/systemd/orbmesh-wireguard-go"):
        (root / stale).parent.mkdir(parents=True, exist_ok=True)
        (root / stale).write_text("old\n")
    done = install(root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (root / "opt/orbmesh").iterdir()) == ["README.md", "deploy", "docs"]
    assert not (root / "opt/orbmesh/deploy/systemd/orbmesh-wireguard-go").exists()


@pytest.mark.parametrize("bad", [["--wheels", "/nonexistent/wheels"], ["--wireguard", "magic"]])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, bad):
    root = tmp_path / "root"
    done = install(root, *bad)
    assert done.returncode != 0 and "install.sh:" in done.stderr
    assert not (root / "etc").exists()


SYSCTL_FILE = "etc/sysctl.d/60-orbmesh-ipv6.conf"


def sysctl_lines(root):
    """The settings of the installed sysctl.d file, in order (comments and blank lines out)."""
    text = (root / SYSCTL_FILE).read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_ipv6_forwarding_is_off_unless_asked_for_and_says_what_that_means(installed):
    root, first = installed
    assert not (root / SYSCTL_FILE).exists()
    assert env_of(root / "etc/orbmesh/deploy.conf")["IPV6_FORWARDING"] == "off"
    assert "IPv6 forwarding is off: tunnel clients get no IPv6 address, only IPv4" in first.stdout
    assert "--ipv6-forwarding turns it on" in first.stdout


@pytest.mark.parametrize("uplink, ra", [("eth0", "net/ipv6/conf/eth0/accept_ra = 2"),
                                        ("eth0.100", "net/ipv6/conf/eth0.100/accept_ra = 2"),  # '/' form: dots
                                        (None, None)])
def test_ipv6_forwarding_is_written_on_request_kept_and_removed(tmp_path, uplink, ra):
    root = tmp_path / "root"
    (root / "etc/orbmesh").mkdir(parents=True)
    (root / "etc/orbmesh/orbmesh.env").write_text("ORBMESH_JWT_SECRET=x\n" + (
        "ORBMESH_NAT_UPLINK=%s\n" % uplink if uplink else "#ORBMESH_NAT_UPLINK=eth0\n"))
    done = install(root, "--ports", "8081", "--ipv6-forwarding")
    assert done.returncode == 0, done.stdout + done.stderr
    # accept_ra before forwarding: switching forwarding on drops RA default routes on links without it.
    assert sysctl_lines(root) == ([ra] if ra else []) + ["net.ipv6.conf.all.forwarding = 1"]
    assert stat.S_IMODE((root / SYSCTL_FILE).stat().st_mode) == 0o644
    assert env_of(root / "etc/orbmesh/deploy.conf")["IPV6_FORWARDING"] == "on"
    assert "IPv6 forwarding is on (/etc/sysctl.d/60-orbmesh-ipv6.conf)" in done.stdout
    assert "IPv6 forwarding is off" not in done.stdout
    if not uplink:
        assert "No ORBMESH_NAT_UPLINK in /etc/orbmesh/orbmesh.env yet" in (root / SYSCTL_FILE).read_text()

    # Kept: a later run without the option changes nothing.
    again = install(root)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr
    assert (root / SYSCTL_FILE).exists()

    off = install(root, "--no-ipv6-forwarding")
    assert off.returncode == 0, off.stdout + off.stderr
    assert not (root / SYSCTL_FILE).exists() and "removed /etc/sysctl.d/60-orbmesh-ipv6.conf" in off.stdout
    assert env_of(root / "etc/orbmesh/deploy.conf")["IPV6_FORWARDING"] == "off"
    assert "IPv6 forwarding is off" in off.stdout


def test_the_api_port_tunnel_clients_reach_follows_nginx(installed):
    root, _ = installed
    done = install(root, "--listen", "[::]:9443,9443")
    assert done.returncode == 0, done.stdout + done.stderr
    backend = (root / "etc/systemd/system/orbmesh-wghelper.service.d/backend.conf").read_text()
    assert "Environment=ORBMESH_CLIENT_API_PORT=9443" in backend and "=8443" not in backend
