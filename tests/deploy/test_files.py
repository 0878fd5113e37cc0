"""The deployment files: systemd units, the nginx site, gunicorn settings, install.sh syntax.

Tools these checks need (systemd-analyze, nginx, openssl) come from
scripts/bootstrap; without them a check is skipped, except under CI where a
missing tool is a failure.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.need import need

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
RENDER = DEPLOY / "nginx" / "render"
VENV_BIN = Path(sys.executable).parent


def unit_copies(tmp_path):
    """The units with /opt/orbmesh paths pointed at this checkout (verify needs real binaries)."""
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.iterdir():
        text = unit.read_text()
        text = text.replace("/opt/orbmesh/venv/bin/", str(VENV_BIN) + "/")
        text = text.replace("/opt/orbmesh/deploy/", str(DEPLOY) + "/")
        (out / unit.name).write_text(text)
    return out


def directives(unit_text):
    """{(section, key): [values]} of a unit file."""
    found, section = {}, None
    for line in unit_text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault((section, key), []).append(value)
    return found


# --- systemd ---------------------------------------------------------------------

@pytest.mark.parametrize("unit", ["orbmesh-wghelper.service", "orbmesh-api@8081.service", "orbmesh-unbound.service",
                                  "orbmesh.target", "orbmesh-down.service", "orbmesh-wireguard-go@wg0.service"])
def test_systemd_analyze_verify(tmp_path, unit):
    tool = need("systemd-analyze")
    units = unit_copies(tmp_path)
    result = subprocess.run([tool, "verify", str(units / unit)], cwd=units, capture_output=True, text=True)
    # verify exits 0 on some problems (unknown keys, for one) and only warns: no output at all is the bar.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """Control: the check above does fail on a unit systemd would not run."""
    tool = need("systemd-analyze")
    units = unit_copies(tmp_path)
    path = units / "orbmesh-wghelper.service"
    path.write_text(path.read_text().replace("ExecStart=" + str(VENV_BIN), "ExecStart=/nonexistent"))
    result = subprocess.run([tool, "verify", str(path)], cwd=units, capture_output=True, text=True)
    assert result.returncode != 0 or (result.stdout + result.stderr).strip()


def test_helper_unit_hardening():
    d = directives((UNITS / "orbmesh-wghelper.service").read_text())
    assert d[("Service", "CapabilityBoundingSet")] == ["CAP_NET_ADMIN"]
    assert d[("Service", "DeviceAllow")] == ["/dev/net/tun rw"] and d[("Service", "DevicePolicy")] == ["closed"]
    for key, value in (("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("StateDirectory", "orbmesh-wghelper"),
                       ("StateDirectoryMode", "0700"), ("RuntimeDirectory", "orbmesh"),
                       ("RuntimeDirectoryMode", "0750"), ("Group", "orbmesh"),
                       ("EnvironmentFile", "/etc/orbmesh/orbmesh.env"),
                       ("ExecStart", "/opt/orbmesh/venv/bin/orbmesh-wghelper"),
                       ("Restart", "on-failure"), ("KillSignal", "SIGTERM"),
                       ("UnsetEnvironment", "ORBMESH_JWT_SECRET ORBMESH_API_KEYS")):
        assert d[("Service", key)] == [value], key
    # /proc/sys read-only but for the net conf keys (the e2e deploy stack runs the helper so, tests/e2e/deploy_stack.py).
    for key, value in (("ProtectKernelTunables", "yes"), ("SystemCallFilter", "@system-service"),
                       ("MemoryMax", "1G"), ("TasksMax", "1024")):
        assert d[("Service", key)] == [value], key
    assert " ".join(d[("Service", "ReadWritePaths")]).split() == [
        "/proc/sys/net/ipv4/conf", "-/proc/sys/net/ipv6/conf", "-/run/wireguard"]
    # No way to systemd or D-Bus (it would start any unit as unconfined root), nor to the TLS key.
    assert d[("Service", "InaccessiblePaths")][0].split() == [
        "/run/systemd/private", "-/run/dbus", "-/etc/orbmesh/tls", "-/etc/shadow", "-/etc/gshadow"]
    # Nothing in it reaches for /run/wireguard before systemd's namespace is set up (226/NAMESPACE at boot).
    assert not any(v.startswith("+") for v in d.get(("Service", "ExecStartPre"), []))
    assert ("Service", "AmbientCapabilities") not in d
    assert ("Service", "SecureBits") not in d  # noroot would strip the capabilities of root itself
    assert ("Service", "TimeoutStopSec") in d


def test_units_keep_tunnels_across_restarts_and_stop_removes_them():
    """What survives what (docs/operations.md): wireguard-go in a unit of its own that systemd starts (the
    helper cannot reach systemd), the teardown an explicit act when orbmesh.target stops, ordered after the
    helper (so no watcher re-creates meanwhile)."""
    helper = directives((UNITS / "orbmesh-wghelper.service").read_text())
    assert ("Service", "Environment") not in helper  # the backend comes from install.sh's drop-in
    assert helper[("Service", "KillMode")] == ["process"]  # bridge links' wireguard-go outlive a restart
    assert not (UNITS / "orbmesh-wireguard-go").exists()
    wg = directives((UNITS / "orbmesh-wireguard-go@.service").read_text())
    assert wg[("Service", "ExecStart")] == ["/usr/bin/wireguard-go %I"] and wg[("Service", "Type")] == ["forking"]
    assert wg[("Service", "Restart")] == ["always"] and wg[("Install", "WantedBy")] == ["orbmesh.target"]
    assert wg[("Unit", "PartOf")] == ["orbmesh.target"]
    assert wg[("Unit", "Before")] == ["orbmesh-wghelper.service"] and wg[("Unit", "After")] == ["orbmesh-down.service"]
    # /run/wireguard made by systemd on every boot, and kept: the helper adopts the link through its socket.
    assert (wg[("Service", "RuntimeDirectory")], wg[("Service", "RuntimeDirectoryPreserve")]) == (
        ["wireguard"], ["yes"])
    assert ("Service", "ExecStartPre") not in wg and ("Service", "ReadWritePaths") not in wg
    assert wg[("Service", "CapabilityBoundingSet")] == ["CAP_NET_ADMIN"]
    assert wg[("Service", "DeviceAllow")] == ["/dev/net/tun rw"] and wg[("Service", "ProtectSystem")] == ["strict"]
    down = directives((UNITS / "orbmesh-down.service").read_text())
    for key, value in (("Type", "oneshot"), ("RemainAfterExit", "yes"), ("ExecStart", "/bin/true"),
                       ("ExecStop", "/opt/orbmesh/venv/bin/orbmesh-wghelper down"),
                       ("EnvironmentFile", "/etc/orbmesh/orbmesh.env"), ("CapabilityBoundingSet", "CAP_NET_ADMIN")):
        assert down[("Service", key)] == [value], key
    assert down[("Unit", "Before")] == ["orbmesh-wghelper.service"] and down[("Unit", "PartOf")] == ["orbmesh.target"]
    assert down[("Install", "WantedBy")] == ["orbmesh.target"]
    target = directives((UNITS / "orbmesh.target").read_text())
    assert "orbmesh-down.service" in target[("Unit", "Wants")][0].split()


def test_api_unit_hardening():
    d = directives((UNITS / "orbmesh-api@.service").read_text())
    for key, value in (("User", "orbmesh"), ("Group", "orbmesh"), ("SupplementaryGroups", "orbmesh"),
                       ("CapabilityBoundingSet", ""), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ReadWritePaths", "/var/lib/orbmesh"), ("RuntimeDirectory", "orbmesh-api/%i"),
                       ("Restart", "on-failure"),
                       ("ExecStart", "/opt/orbmesh/venv/bin/gunicorn -c /opt/orbmesh/deploy/gunicorn.conf.py "
                                     "app:create_app()")):
        assert d[("Service", key)] == [value], key
    env = d[("Service", "Environment")]
    assert "ORBMESH_BIND=127.0.0.1:%i" in env and "PROMETHEUS_MULTIPROC_DIR=/run/orbmesh-api/%i" in env
    assert "orbmesh-wghelper.service" in d[("Unit", "After")][0]
    assert d[("Unit", "Wants")] == ["orbmesh-wghelper.service"]


def test_unbound_unit_runs_as_its_own_user_apart_from_the_node():
    d = directives((UNITS / "orbmesh-unbound.service").read_text())
    for key, value in (("User", "unbound"), ("Group", "unbound"), ("NoNewPrivileges", "yes"),
                       ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
                       ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"), ("ProtectSystem", "strict"),
                       ("RuntimeDirectory", "orbmesh-unbound"), ("Restart", "on-failure"),
                       ("EnvironmentFile", "/etc/orbmesh/orbmesh.env"),
                       ("ExecCondition", "+/opt/orbmesh/venv/bin/orbmesh-wg dns-config --check-enabled"),
                       ("ExecStart", "/usr/sbin/unbound -d -p -c /run/orbmesh-unbound/unbound.conf")):
        assert d[("Service", key)] == [value], key
    # The config Unbound reads is the one rendered just before, as root, from the settings and the helper.
    pre = d[("Service", "ExecStartPre")]
    assert pre == ['+/opt/orbmesh/venv/bin/orbmesh-wg dns-config --wait 60 --username "" '
                   '--output /run/orbmesh-unbound/unbound.conf']
    # Ordered after the helper, but never restarted or stopped with it (or with the API): only with the target.
    assert "orbmesh-wghelper.service" in d[("Unit", "After")][0]
    assert d[("Unit", "PartOf")] == ["orbmesh.target"]
    for key in ("Requires", "BindsTo", "Requisite"):
        assert ("Unit", key) not in d, key
    assert d[("Install", "WantedBy")] == ["orbmesh.target"]


# --- nginx ---------------------------------------------------------------------------

def make_cert(directory, name="test"):
    need("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=" + name, "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def render(*args):
    return subprocess.run([str(RENDER)] + list(args), capture_output=True, text=True)


def nginx_test(tmp_path, site):
    """`nginx -t` on a minimal nginx.conf that includes the site, everything under tmp_path."""
    nginx = need("nginx")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir(exist_ok=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text("""
pid {t}/nginx.pid;
error_log {t}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
    include {site};
}}
""".format(t=tmp_path, site=site))
    return subprocess.run([nginx, "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")],
                          capture_output=True, text=True)


def test_rendered_site_passes_nginx_t(tmp_path):
    cert, key = make_cert(tmp_path)
    result = render("--ports", "8081,8082,8083", "--allow", "198.51.100.7, 2001:db8::/64",
                    "--listen", "127.0.0.1:18443,[::1]:18443", "--cert", str(cert), "--key", str(key))
    assert result.returncode == 0, result.stderr
    site = tmp_path / "orbmesh.conf"
    site.write_text(result.stdout)
    checked = nginx_test(tmp_path, site)
    assert checked.returncode == 0, checked.stderr


def test_nginx_t_catches_a_broken_site(tmp_path):
    """Control: nginx -t does read the site."""
    cert, key = make_cert(tmp_path)
    site = tmp_path / "orbmesh.conf"
    site.write_text(render("--ports", "8081", "--cert", str(cert), "--key", str(key)).stdout + "bogus;\n")
    assert nginx_test(tmp_path, site).returncode != 0


def test_rendered_site_content():
    result = render("--ports", "8081,8082", "--allow", "198.51.100.7,2001:db8::/64")
    assert result.returncode == 0, result.stderr
    site = result.stdout
    assert not re.search(r"@[A-Z_]+@", site), "a placeholder was left"
    assert "\n#:" not in site
    upstream = site[site.index("upstream orbmesh_api"):site.index("}", site.index("upstream orbmesh_api"))]
    assert "hash $orbmesh_device_token consistent;" in upstream
    assert "server 127.0.0.1:8081 " in upstream and "server 127.0.0.1:8082 " in upstream
    assert upstream.index("hash ") < upstream.index("keepalive ")  # nginx requires hash before keepalive
    assert "listen 8443 ssl;" in site and "listen [::]:8443 ssl;" in site
    assert "ssl_certificate     /etc/orbmesh/tls/cert.pem;" in site
    assert "ssl_certificate_key /etc/orbmesh/tls/key.pem;" in site
    assert "client_max_body_size 64k;" in site

    def block(start):
        i = site.index(start)
        return site[i:site.index("\n    }", i)]

    ws = block("location = /wireguard/ws ")
    for line in ("proxy_set_header Upgrade $http_upgrade;", "proxy_set_header Connection $orbmesh_ws_connection;",
                 "proxy_set_header X-Real-IP $remote_addr;", "proxy_read_timeout 1h;", "proxy_send_timeout 1h;"):
        assert line in ws, line
    tunnel = block("location = /wireguard/tunnel ")
    for line in ("client_max_body_size 1m;", "proxy_request_buffering off;", "proxy_buffering off;",
                 "proxy_read_timeout 60s;"):
        assert line in tunnel, line
    internal = block("location / ")
    allows = re.findall(r"allow (\S+);", internal)
    assert allows == ["127.0.0.1", "::1", "198.51.100.7", "2001:db8::/64"]
    assert internal.index("allow 2001:db8::/64;") < internal.index("deny all;") < internal.index("proxy_pass")
    # The device-token endpoints are public, the relay's probe ticket among them (behind nginx a
    # missing one would be a 403, which ends orbmesh-relay --transport auto).
    for path in ("/wireguard/connect", "/wireguard/disconnect", "/wireguard/probe", "/health", "/openapi.json"):
        assert re.search(r"location = %s +\{ proxy_pass http://orbmesh_api; \}" % re.escape(path), site), path
    # The internal endpoints have no public location of their own: they fall to "location /".
    for path in ("/wireguard/status", "/wireguard/add-peer", "/wireguard/remove-peer", "/metrics"):
        assert "location = %s " % path not in site and "location %s " % path not in site


def test_nginx_hashes_on_the_token_the_app_reads():
    """The map takes the token out of Authorization with the app's own pattern (app/api/auth.py)."""
    from app.api.auth import BEARER_PATTERN
    site = render("--ports", "8081").stdout
    block = site[site.index("map $http_authorization $orbmesh_device_token {"):]
    block = block[:block.index("}")]
    assert re.search(r"default +\$http_authorization;", block)
    (pattern, value), = re.findall(r'"~\*(.*)" +(\S+);', block)
    assert (pattern, value) == (BEARER_PATTERN, "$1")


def test_a_padded_token_hashes_as_the_token():
    """The map's $1 leaves trailing "=" out, so "T=" (which the app refuses) meets T's instance."""
    from app.api.auth import BEARER_PATTERN
    from tests.app.api.test_auth_attacks import BEARER_SPELLINGS, PADDED_SPELLINGS
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJlLW9mLTMyLWJ5dGVzLi4uLi4uLi4uLi4uLi4"
    nginx = re.compile(BEARER_PATTERN, re.IGNORECASE)  # "~*": PCRE, case-insensitive
    hashed = {nginx.match(spelling.format(token)).group(1) for spelling in BEARER_SPELLINGS + PADDED_SPELLINGS}
    assert hashed == {token}


@pytest.mark.parametrize("args", [
    ["--ports", ""],
    ["--ports", "8081;"],
    ["--ports", "70000"],
    ["--ports", "8081", "--allow", "1.2.3.4; allow all"],
    ["--ports", "8081", "--allow", "all"],
    ["--ports", "8081", "--listen", "8443 default_server"],
    ["--ports", "8081", "--cert", "relative.pem"],
    ["--ports", "8081", "--cert", "/etc/x.pem;include /etc/shadow"],
    ["--ports", "8081", "--bogus", "x"],
])
def test_render_refuses_malformed_values(args):
    result = render(*args)
    assert result.returncode != 0 and result.stdout == ""


# --- gunicorn -----------------------------------------------------------------------------

def test_gunicorn_conf_loads(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ORBMESH_BIND": "127.0.0.1:18099",
           "ORBMESH_JWT_SECRET": "s" * 48, "ORBMESH_API_KEYS": "k" * 24,
           "ORBMESH_DB_PATH": str(tmp_path / "db.sqlite"), "ORBMESH_HELPER_SOCKET": str(tmp_path / "h.sock"),
           "ORBMESH_RECONCILE_CHECK_INTERVAL": "0"}
    result = subprocess.run([str(VENV_BIN / "gunicorn"), "-c", str(DEPLOY / "gunicorn.conf.py"),
                             "--print-config", "app:create_app()"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    config = dict(re.findall(r"^(\w+)\s+= (.*)$", result.stdout, re.M))
    assert config["bind"] == "['127.0.0.1:18099']"
    assert config["worker_class"] == "gevent" and config["workers"] == "1"
    assert config["limit_request_line"] == "8190"  # a long query reaches the app: a 400 in the envelope
    assert config["preload_app"] == "False" and config["accesslog"] == "None"
    assert config.get("control_socket_disable", "True") == "True"


def test_gunicorn_child_exit_hook_is_safe_without_metrics(monkeypatch):
    import runpy
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    assert conf["bind"] and conf["workers"] == 1
    calls = []
    fake = type(sys)("app.ops.metrics")
    fake.child_exit = lambda server, worker: calls.append((server, worker))
    monkeypatch.setitem(sys.modules, "app.ops.metrics", fake)
    conf["child_exit"]("server", "worker")
    assert calls == [("server", "worker")]
    monkeypatch.setitem(sys.modules, "app.ops.metrics", None)  # import fails: the hook does nothing
    conf["child_exit"]("server", "worker")
    assert len(calls) == 1


# --- install.sh ----------------------------------------------------------------------------

def test_install_sh_syntax():
    for script in (DEPLOY / "install.sh", RENDER):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
