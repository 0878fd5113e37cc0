#!/usr/bin/env bash
# Install the OrbMesh WireGuard node on a fresh Debian 12 host, as root:
#
#   deploy/install.sh [--ports 8081,8082] [--orbnet-allow 198.51.100.7,2001:db8::/64]
#                     [--listen 8443,[::]:8443] [--cert FULLCHAIN.pem --key KEY.pem]
#                     [--server-name vpn.example.net] [--wireguard auto|kernel|wireguard-go]
#                     [--ipv6-forwarding | --no-ipv6-forwarding]
#                     [--wheels DIR] [--root DIR] [--no-venv]
#
# Debian packages (Unbound among them), the system user "orbmesh", this
# checkout installed as a package (not editable) into the virtualenv
# /opt/orbmesh/venv, /etc/orbmesh/orbmesh.env (made once, with random
# secrets), a TLS certificate (self-signed unless --cert/--key), the nginx
# site, the systemd units (orbmesh-unbound.service: the DNS resolver on the
# WireGuard gateway, its config rendered at each start); then it enables and
# starts orbmesh.target and reloads nginx when systemd is running (otherwise
# it only enables, and says so).
#
# Idempotent: a second run with the same choices changes no file.  The choices
# (ports, OrbNET allow list, listen addresses, WireGuard, IPv6 forwarding) are kept in
# /etc/orbmesh/deploy.conf, so a later run without options keeps them.
#
#   --ports LIST         gunicorn instances (orbmesh-api@PORT on 127.0.0.1);
#                        default: one per CPU from 8081
#   --orbnet-allow LIST  addresses/networks allowed to the internal endpoints
#                        (status, add-peer, remove-peer, metrics); loopback always
#   --listen LIST        nginx TLS listen addresses (default 8443,[::]:8443)
#   --cert/--key FILE    a real certificate chain and key to install
#   --server-name NAME   name (or IP) in the self-signed certificate (default: hostname -f)
#   --wireguard WHICH    kernel: the helper makes the link; wireguard-go: the
#                        orbmesh-wireguard-go@IF unit runs the userspace daemon;
#                        auto (default): kernel when this kernel has WireGuard
#   --ipv6-forwarding    give tunnel clients IPv6 beyond this server: writes and
#                        applies /etc/sysctl.d/60-orbmesh-ipv6.conf
#                        (net.ipv6.conf.all.forwarding=1, accept_ra=2 on
#                        ORBMESH_NAT_UPLINK); --no-ipv6-forwarding removes it.
#                        Without forwarding clients get no IPv6, only IPv4
#   --wheels DIR         offline: Python packages only from the wheels in DIR,
#                        never from an index (build DIR where PyPI is reachable:
#                        deploy/build-wheels DIR)
#   --root DIR           install into DIR instead of / (for tests and images): no
#                        apt, no user creation, no chown, no service start; every
#                        file is still rendered and placed, units enabled with
#                        "systemctl --root"
#   --no-venv            do not build /opt/orbmesh/venv (tests; building it is slow)
set -euo pipefail
umask 022
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=""
NO_VENV=0
OPT_PORTS=""
OPT_ALLOW=""
OPT_ALLOW_SET=0
OPT_LISTEN=""
CERT_IN=""
KEY_IN=""
SERVER_NAME=""
OPT_WIREGUARD=""
OPT_IPV6_FORWARDING=""
WHEELS=""

die() { echo "install.sh: $*" >&2; exit 1; }
SCRATCH=()  # removed at exit
trap 'rm -rf "${SCRATCH[@]}"' EXIT
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --no-venv) NO_VENV=1; shift ;;
        --ports) OPT_PORTS="${2:?}"; shift 2 ;;
        --orbnet-allow) OPT_ALLOW="${2-}"; OPT_ALLOW_SET=1; shift 2 ;;
        --listen) OPT_LISTEN="${2:?}"; shift 2 ;;
        --cert) CERT_IN="${2:?}"; shift 2 ;;
        --key) KEY_IN="${2:?}"; shift 2 ;;
        --server-name) SERVER_NAME="${2:?}"; shift 2 ;;
        --wireguard) OPT_WIREGUARD="${2:?}"; shift 2 ;;
        --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
        --ipv6-forwarding) OPT_IPV6_FORWARDING=on; shift ;;
        --no-ipv6-forwarding) OPT_IPV6_FORWARDING=off; shift ;;
        -h|--help) sed -n '/^set -euo pipefail/q;2,$p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[ -z "$ROOT" ] && [ -n "${DESTDIR:-}" ] && ROOT="$DESTDIR"
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" != "/" ] || ROOT=""
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --root DIR to install into a directory)"
fi
case "$OPT_WIREGUARD" in ""|auto|kernel|wireguard-go) ;; *) die "--wireguard: auto, kernel or wireguard-go" ;; esac
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || die "--wheels: no directory $WHEELS"
    WHEELS="$(cd "$WHEELS" && pwd)"
fi
if [ -n "$CERT_IN" ] || [ -n "$KEY_IN" ]; then
    [ -f "$CERT_IN" ] && [ -f "$KEY_IN" ] || die "--cert and --key must both name existing files"
fi

R="$ROOT"            # prefix for every path written
APP_USER=orbmesh
CHANGED=0
note() { echo "install.sh: $*"; }

# --- helpers: write only what differs, so a second run changes nothing -----

owner() {  # owner PATH USER:GROUP (skipped under --root: the users may not exist)
    [ -n "$ROOT" ] || chown -h "$2" "$1"
}

dir() {  # dir PATH MODE [USER:GROUP]
    local path="$R$1"
    if [ ! -d "$path" ]; then
        mkdir -p "$path"
        CHANGED=$((CHANGED + 1))
    fi
    chmod "$2" "$path"
    owner "$path" "${3:-root:root}"
}

put() {  # put SOURCE DEST MODE [USER:GROUP]
    local src="$1" dest="$R$2"
    if [ ! -f "$dest" ] || [ -L "$dest" ] || ! cmp -s "$src" "$dest"; then
        mkdir -p "$(dirname "$dest")"
        cp "$src" "$dest.new.$$"
        chmod "$3" "$dest.new.$$"
        mv -f "$dest.new.$$" "$dest"
        CHANGED=$((CHANGED + 1))
        note "wrote $2"
    fi
    chmod "$3" "$dest"
    owner "$dest" "${4:-root:root}"
}

put_text() {  # put_text DEST MODE [USER:GROUP] < text
    local tmp
    tmp="$(mktemp)"
    cat > "$tmp"
    put "$tmp" "$@"
    rm -f "$tmp"
}

link() {  # link TARGET NAME
    if [ "$(readlink "$R$2" 2>/dev/null || true)" != "$1" ]; then
        mkdir -p "$(dirname "$R$2")"
        ln -sfn "$1" "$R$2"
        CHANGED=$((CHANGED + 1))
        note "linked $2 -> $1"
    fi
}

# --- Debian packages ---------------------------------------------------------

# dns-root-data: the DNSSEC root trust anchor (only recommended by unbound).
# python3-nftables: libnftables' own Python binding, which the helper applies
# its nftables table with (linked into the venv below).
DEBS=(wireguard-tools wireguard-go iproute2 nftables python3-nftables nginx python3-venv openssl unbound dns-root-data)
if [ -n "$ROOT" ]; then
    note "--root: skipping Debian packages (${DEBS[*]})"
else
    missing=()
    for pkg in "${DEBS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        note "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # No recommends: wireguard-tools would otherwise pull in a kernel image.
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# --- the orbmesh system user -------------------------------------------------

if [ -n "$ROOT" ]; then
    note "--root: skipping the system user '$APP_USER' and ownership (chown)"
else
    getent group "$APP_USER" >/dev/null || groupadd --system "$APP_USER"
    getent passwd "$APP_USER" >/dev/null || useradd --system --gid "$APP_USER" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin "$APP_USER"
fi

# --- directories -------------------------------------------------------------

dir /etc/orbmesh 0750 "root:$APP_USER"
dir /etc/orbmesh/tls 0700 root:root
dir /var/lib/orbmesh 0750 "$APP_USER:$APP_USER"
dir /opt/orbmesh 0755 root:root
dir /etc/systemd/system 0755 root:root
dir /etc/nginx/sites-available 0755 root:root
dir /etc/nginx/sites-enabled 0755 root:root

# --- /opt/orbmesh: the virtualenv, and the files the units name ---------------

# The code itself goes into the virtualenv as a package (below); here only
# what the units and their Documentation= lines read: gunicorn's settings and
# the manual.  Anything else under /opt/orbmesh but the venv goes, such as
# the copied app/ and wghelper/ of an older install.sh, which gunicorn (its
# working directory is /opt/orbmesh) would otherwise import ahead of the venv.
DEST="$R/opt/orbmesh"
DATA=(deploy docs README.md)
data_files() {
    (cd "$SRC" && find "${DATA[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort)
}
if [ "$(cd "$DEST" && pwd -P)" = "$(cd "$SRC" && pwd -P)" ]; then
    die "run install.sh from a checkout, not from /opt/orbmesh"
fi
while IFS= read -r file; do
    mode=0644
    [ -x "$SRC/$file" ] && mode=0755
    put "$SRC/$file" "/opt/orbmesh/$file" "$mode"
done < <(data_files)
wanted="$(data_files)"
while IFS= read -r file; do
    if ! grep -qxF "$file" <<<"$wanted"; then
        rm -f "$DEST/$file"
        CHANGED=$((CHANGED + 1))
        note "removed /opt/orbmesh/$file"
    fi
done < <(cd "$DEST" && find . -path ./venv -prune -o ! -type d -print | sed 's|^\./||' | LC_ALL=C sort)
(cd "$DEST" && find . -mindepth 1 -path ./venv -prune -o -type d -empty -print | xargs -r rmdir -p 2>/dev/null || true)

VENV="$DEST/venv"
if [ "$NO_VENV" = 1 ]; then
    note "--no-venv: not building $VENV"
else
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    INDEX=()
    [ -z "$WHEELS" ] || INDEX=(--no-index --find-links "$WHEELS")
    if [ ! -x "$VENV/bin/python" ]; then
        note "creating virtualenv /opt/orbmesh/venv"
        python3 -m venv "$VENV"
        CHANGED=$((CHANGED + 1))
    fi
    BUILD="$(mktemp -d)"
    SCRATCH+=("$BUILD")
    # The checkout as a wheel, built from a copy: setuptools writes build/ and
    # *.egg-info where it builds, and the checkout may be read-only.  Every
    # package setup.cfg names is in it; nothing here lists them.
    mkdir "$BUILD/src"
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./.run --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$BUILD/src" -xf -
    "${PIP[@]}" wheel "${INDEX[@]}" --no-deps -w "$BUILD/dist" "$BUILD/src" >/dev/null
    WHEEL="$(ls "$BUILD"/dist/*.whl)"
    # requirements.txt pins the versions (pip takes no extras in a constraints file).
    sed -E 's/\[[^]]*\]//' "$SRC/requirements.txt" > "$BUILD/constraints.txt"
    # What is installed is known by the wheel's RECORD (every file and its
    # hash) and the pins, so an unchanged tree is not installed again.
    stamp="$VENV/.orbmesh-installed"
    digest="$("$VENV/bin/python" - "$WHEEL" "$BUILD/constraints.txt" <<'PY'
import hashlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    lines = sorted(line for line in wheel.read(record).decode().splitlines() if not line.startswith(record + ","))
print(hashlib.sha256("\n".join(lines).encode() + open(sys.argv[2], "rb").read()).hexdigest())
PY
)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] \
            || ! (cd / && "$VENV/bin/python" -c "import app, wghelper, orbmesh_relay") 2>/dev/null; then
        note "installing $(basename "$WHEEL") and its dependencies into /opt/orbmesh/venv${WHEELS:+ (from $WHEELS only)}"
        "${PIP[@]}" install "${INDEX[@]}" -c "$BUILD/constraints.txt" "$WHEEL"
        # The same version number may hold other code: this tree's goes in.
        "${PIP[@]}" install "${INDEX[@]}" --no-deps --force-reinstall "$WHEEL"
        echo "$digest" > "$stamp"
        CHANGED=$((CHANGED + 1))
    fi
    # libnftables' binding is Debian's (python3-nftables: not on PyPI, and it
    # must match the installed library); the venv sees that one package only.
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    link /usr/lib/python3/dist-packages/nftables "${site#"$R"}/nftables"
fi

# --- settings: /etc/orbmesh/orbmesh.env, made once ----------------------------

ENV_FILE=/etc/orbmesh/orbmesh.env
if [ ! -e "$R$ENV_FILE" ]; then
    secret="$(head -c 48 /dev/urandom | base64 | tr -d '\n=+/')"
    api_key="$(head -c 24 /dev/urandom | base64 | tr -d '\n=+/')"
    put_text "$ENV_FILE" 0640 "root:$APP_USER" <<EOF
# OrbMesh WireGuard node settings (README, "Configuration"), read by
# orbmesh-wghelper.service and every orbmesh-api@PORT.service.  Made once by
# deploy/install.sh; never overwritten.  After a change (every tunnel stays up;
# a new key, port or pool re-creates the interface):
#   systemctl restart orbmesh-wghelper.service 'orbmesh-api@*.service'
# "systemctl restart orbmesh.target" removes everything first.

# Device tokens: OrbNET's HS256 secret (this random one is a placeholder until
# you paste OrbNET's), or ORBMESH_JWT_ALGORITHM + ORBMESH_JWT_PUBLIC_KEY_FILE.
ORBMESH_JWT_SECRET=$secret
# Internal API keys for OrbNET (X-API-Key), comma-separated.
ORBMESH_API_KEYS=$api_key

# Host or IP the apps use to reach WireGuard (serverEndpoint).  Set this.
#ORBMESH_PUBLIC_HOST=vpn.example.net
# Interface towards the internet: the helper enables forwarding and adds an
# nftables masquerade for the pool out of it.  Set this for full tunnels.
#ORBMESH_NAT_UPLINK=eth0
#ORBMESH_INTERFACE=wg0
#ORBMESH_LISTEN_PORT=51820
# UDP probe echo for orbmesh-relay --transport auto (0: off); open it beside WireGuard's.
#ORBMESH_PROBE_PORT=51822
#ORBMESH_POOL=10.8.0.0/16
# Clients' IPv6 pool: auto (this node's unique-local /64, made once, NAT66 out of
# the uplink), a routed prefix (no NAT66), or off.  Clients get IPv6 only while
# net.ipv6.conf.all.forwarding=1: deploy/install.sh --ipv6-forwarding
# (docs/operations.md, "Dual stack").
#ORBMESH_POOL6=auto

# DNS for clients: Unbound on the gateway address (orbmesh-unbound.service),
# recursive from the root unless given upstream resolvers; DNSSEC validated.
# After a change: systemctl restart orbmesh-unbound
#ORBMESH_DNS_RESOLVER=on
#ORBMESH_DNS_UPSTREAM=9.9.9.9,149.112.112.112
#ORBMESH_DNS_DNSSEC=on

ORBMESH_DB_PATH=/var/lib/orbmesh/orbmesh.db
ORBMESH_HELPER_SOCKET=/run/orbmesh/wghelper.sock
ORBMESH_HELPER_SOCKET_GROUP=$APP_USER
# root: orbmesh-unbound.service asks the helper for its addresses before Unbound starts.
ORBMESH_HELPER_ALLOWED_UIDS=$APP_USER,root
ORBMESH_HELPER_STATE_DIR=/var/lib/orbmesh-wghelper
EOF
else
    chmod 0640 "$R$ENV_FILE"
    owner "$R$ENV_FILE" "root:$APP_USER"
fi

# --- deployment choices: /etc/orbmesh/deploy.conf -----------------------------

DEPLOY_CONF=/etc/orbmesh/deploy.conf
API_PORTS=""
ORBNET_ALLOW=""
NGINX_LISTEN=""
WIREGUARD=""
IPV6_FORWARDING=""
if [ -f "$R$DEPLOY_CONF" ]; then
    while IFS='=' read -r key value; do
        case "$key" in
            API_PORTS) API_PORTS="$value" ;;
            ORBNET_ALLOW) ORBNET_ALLOW="$value" ;;
            NGINX_LISTEN) NGINX_LISTEN="$value" ;;
            WIREGUARD) WIREGUARD="$value" ;;
            IPV6_FORWARDING) IPV6_FORWARDING="$value" ;;
        esac
    done < "$R$DEPLOY_CONF"
fi
[ -n "$OPT_WIREGUARD" ] && WIREGUARD="$OPT_WIREGUARD"
case "$WIREGUARD" in kernel|wireguard-go) ;; *) WIREGUARD=auto ;; esac
[ -n "$OPT_IPV6_FORWARDING" ] && IPV6_FORWARDING="$OPT_IPV6_FORWARDING"
[ "$IPV6_FORWARDING" = on ] || IPV6_FORWARDING=off
if [ -z "$API_PORTS" ]; then
    cpus="$(nproc 2>/dev/null || echo 1)"
    API_PORTS="$(seq -s, 8081 $((8080 + cpus)))"
fi
[ -n "$OPT_PORTS" ] && API_PORTS="$OPT_PORTS"
[ "$OPT_ALLOW_SET" = 1 ] && ORBNET_ALLOW="$OPT_ALLOW"
[ -n "$OPT_LISTEN" ] && NGINX_LISTEN="$OPT_LISTEN"
[ -n "$NGINX_LISTEN" ] || NGINX_LISTEN="8443,[::]:8443"
# Spaces and empty items out, so the file (and the second run) is canonical.
canon() { tr -d ' \t' <<<"$1" | tr -s ',' | sed 's/^,//; s/,$//'; }
API_PORTS="$(canon "$API_PORTS")"
ORBNET_ALLOW="$(canon "$ORBNET_ALLOW")"
NGINX_LISTEN="$(canon "$NGINX_LISTEN")"

# Render first: it refuses malformed values before anything records them.
SITE_TMP="$(mktemp)"
SCRATCH+=("$SITE_TMP")
"$SRC/deploy/nginx/render" --ports "$API_PORTS" --allow "$ORBNET_ALLOW" --listen "$NGINX_LISTEN" \
    --cert /etc/orbmesh/tls/cert.pem --key /etc/orbmesh/tls/key.pem > "$SITE_TMP"

put_text "$DEPLOY_CONF" 0640 "root:$APP_USER" <<EOF
# deploy/install.sh choices; change them here (or with its options) and run it again.
# gunicorn instances on 127.0.0.1 (orbmesh-api@PORT), comma-separated
API_PORTS=$API_PORTS
# addresses/networks allowed to the internal endpoints besides loopback
ORBNET_ALLOW=$ORBNET_ALLOW
# nginx TLS listen addresses
NGINX_LISTEN=$NGINX_LISTEN
# WireGuard: auto (kernel when this kernel has it, else wireguard-go), kernel or wireguard-go
WIREGUARD=$WIREGUARD
# IPv6 for tunnel clients: on (/etc/sysctl.d/60-orbmesh-ipv6.conf forwards it) or off
IPV6_FORWARDING=$IPV6_FORWARDING
EOF

# --- IPv6 forwarding: /etc/sysctl.d/60-orbmesh-ipv6.conf ----------------------------

env_ifname() {  # env_ifname NAME: an interface name set in orbmesh.env as ORBMESH_NAME, or nothing
    sed -nE "s/^[[:space:]]*ORBMESH_$1=[\"']?([A-Za-z0-9_=+.-]{1,15})[\"']?[[:space:]]*$/\\1/p" "$R$ENV_FILE" \
        | tail -n 1
}
# Linux forwards IPv6 only with net.ipv6.conf.all.forwarding=1, the host's
# switch; the helper reads it at start and gives clients IPv6 only when it is
# on (docs/operations.md, "Dual stack"), so it is written only when asked for.
# accept_ra=2 comes first: switching forwarding on drops the default routes
# learnt from router advertisements, except on links that keep accepting them.
SYSCTL_FILE=/etc/sysctl.d/60-orbmesh-ipv6.conf
if [ "$IPV6_FORWARDING" = on ]; then
    UPLINK="$(env_ifname NAT_UPLINK)"
    if [ -n "$UPLINK" ]; then  # '/' form: an interface name may hold dots
        ra="net/ipv6/conf/$UPLINK/accept_ra = 2"
    else
        ra="# No ORBMESH_NAT_UPLINK in $ENV_FILE yet: set it and run install.sh again for accept_ra = 2 on it."
    fi
    put_text "$SYSCTL_FILE" 0644 <<EOF
# Written by deploy/install.sh (IPV6_FORWARDING=on in $DEPLOY_CONF): tunnel clients
# get IPv6 beyond this server.  The uplink keeps learning its IPv6 default route
# from router advertisements while the host forwards:
$ra
net.ipv6.conf.all.forwarding = 1
EOF
    if [ -z "$ROOT" ] && ! sysctl -q -p "$SYSCTL_FILE"; then
        note "warning: sysctl -p $SYSCTL_FILE failed (is ORBMESH_NAT_UPLINK=$UPLINK an interface here?)"
    fi
    note "IPv6 forwarding is on ($SYSCTL_FILE): tunnel clients get IPv6"
else
    if [ -e "$R$SYSCTL_FILE" ]; then
        rm -f "$R$SYSCTL_FILE"
        CHANGED=$((CHANGED + 1))
        note "removed $SYSCTL_FILE (the running value stays until a reboot or sysctl -w)"
    fi
    if [ -z "$ROOT" ] && [ "$(sysctl -n net.ipv6.conf.all.forwarding 2>/dev/null)" = 1 ]; then
        note "IPv6 forwarding is on (set outside install.sh): tunnel clients get IPv6"
    else
        note "IPv6 forwarding is off: tunnel clients get no IPv6 address, only IPv4 (nothing leaks, no IPv6" \
             "black hole); deploy/install.sh --ipv6-forwarding turns it on"
    fi
fi

# --- TLS certificate ------------------------------------------------------------

CERT=/etc/orbmesh/tls/cert.pem
KEY=/etc/orbmesh/tls/key.pem
if [ -n "$CERT_IN" ]; then
    put "$KEY_IN" "$KEY" 0600 root:root
    put "$CERT_IN" "$CERT" 0644 root:root
elif [ ! -s "$R$CERT" ] || [ ! -s "$R$KEY" ]; then
    name="${SERVER_NAME:-$(hostname -f 2>/dev/null || hostname)}"
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san="IP:$name"; else san="DNS:$name"; fi
    tmpdir="$(mktemp -d)"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
        -subj "/CN=$name" -addext "subjectAltName=$san" \
        -keyout "$tmpdir/key.pem" -out "$tmpdir/cert.pem" 2>/dev/null
    put "$tmpdir/key.pem" "$KEY" 0600 root:root
    put "$tmpdir/cert.pem" "$CERT" 0644 root:root
    rm -rf "$tmpdir"
    note "made a self-signed certificate for $name (replace it: --cert/--key)"
fi

# --- nginx site -------------------------------------------------------------------

put "$SITE_TMP" /etc/nginx/sites-available/orbmesh.conf 0644
link /etc/nginx/sites-available/orbmesh.conf /etc/nginx/sites-enabled/orbmesh.conf

# --- systemd units ------------------------------------------------------------------

for unit in orbmesh-wghelper.service orbmesh-api@.service orbmesh-unbound.service orbmesh.target \
        orbmesh-down.service orbmesh-wireguard-go@.service; do
    put "$SRC/deploy/systemd/$unit" "/etc/systemd/system/$unit" 0644
done

# Which WireGuard.  The helper cannot reach systemd, so without kernel
# WireGuard systemd itself runs wireguard-go for the interface
# (orbmesh-wireguard-go@IF), before the helper, which configures that link.
kernel_wireguard() {  # built in or loaded, or a module modprobe would load
    [ -d /sys/module/wireguard ] || modprobe -n -q wireguard 2>/dev/null
}
BACKEND="$WIREGUARD"
if [ "$BACKEND" = auto ]; then
    if kernel_wireguard; then BACKEND=kernel; else BACKEND=wireguard-go; fi
fi
# The interface the helper manages (ORBMESH_INTERFACE, default wg0).
IFACE="$(env_ifname INTERFACE)"
IFACE="${IFACE:-wg0}"
WG_UNIT="orbmesh-wireguard-go@$(systemd-escape -- "$IFACE").service"
# The port nginx publishes the API on (the first of NGINX_LISTEN): tunnel
# clients may reach it, so an app can disconnect while its full tunnel is up.
first_listen="${NGINX_LISTEN%%,*}"
PUBLIC_PORT="${first_listen##*:}"
if [ "$BACKEND" = kernel ]; then
    put_text /etc/systemd/system/orbmesh-wghelper.service.d/backend.conf 0644 <<EOF
# Written by deploy/install.sh (WIREGUARD=$WIREGUARD, NGINX_LISTEN in /etc/orbmesh/deploy.conf);
# a value set in /etc/orbmesh/orbmesh.env wins over these.
# Kernel WireGuard: the helper makes the link itself.
[Service]
Environment=ORBMESH_WG_BACKEND=kernel
Environment=ORBMESH_CLIENT_API_PORT=$PUBLIC_PORT
EOF
else
    put_text /etc/systemd/system/orbmesh-wghelper.service.d/backend.conf 0644 <<EOF
# Written by deploy/install.sh (WIREGUARD=$WIREGUARD, NGINX_LISTEN in /etc/orbmesh/deploy.conf);
# a value set in /etc/orbmesh/orbmesh.env wins over these.
# No kernel WireGuard: $WG_UNIT runs wireguard-go for $IFACE and the
# helper only configures that link.
[Unit]
Wants=$WG_UNIT
After=$WG_UNIT

[Service]
Environment=ORBMESH_WG_BACKEND=external
Environment=ORBMESH_CLIENT_API_PORT=$PUBLIC_PORT
EOF
fi

INSTANCES=()
for port in ${API_PORTS//,/ }; do INSTANCES+=("orbmesh-api@$port.service"); done
WG_UNITS=()
[ "$BACKEND" = kernel ] || WG_UNITS=("$WG_UNIT")
STALE=()
for path in "$R"/etc/systemd/system/orbmesh.target.wants/orbmesh-{api,wireguard-go}@*.service; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    unit="$(basename "$path")"
    [[ " ${INSTANCES[*]} ${WG_UNITS[*]} " == *" $unit "* ]] || STALE+=("$unit")
done

is_enabled() {  # every unit given is already enabled (no systemctl call changes files)
    local unit
    for unit in "$@"; do
        case "$unit" in
            orbmesh.target) [ -L "$R/etc/systemd/system/multi-user.target.wants/$unit" ] || return 1 ;;
            *) [ -L "$R/etc/systemd/system/orbmesh.target.wants/$unit" ] || return 1 ;;
        esac
    done
}
UNITS=(orbmesh.target orbmesh-down.service "${WG_UNITS[@]}" orbmesh-wghelper.service orbmesh-unbound.service
       "${INSTANCES[@]}")
if [ -n "$ROOT" ]; then
    if [ "${#STALE[@]}" -gt 0 ]; then
        systemctl --root="$ROOT" disable "${STALE[@]}" >/dev/null 2>&1
        CHANGED=$((CHANGED + 1))
    fi
    if ! is_enabled "${UNITS[@]}"; then
        systemctl --root="$ROOT" enable "${UNITS[@]}" >/dev/null 2>&1
        CHANGED=$((CHANGED + 1))
    fi
    note "--root: enabled ${UNITS[*]} in $ROOT; nothing started"
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    [ "${#STALE[@]}" -eq 0 ] || systemctl disable --now "${STALE[@]}"
    systemctl enable --now "${UNITS[@]}"
    nginx -t
    systemctl enable --now nginx.service
    if [ "$CHANGED" -gt 0 ]; then
        # New code, units or site: restart the helper and the API (every tunnel
        # stays up: the helper adopts the interface), and Unbound (it renders
        # its config anew), and reload nginx.  Not wireguard-go: its restart
        # would be a new interface (a new unit file applies at its next start).
        systemctl restart orbmesh-wghelper.service orbmesh-unbound.service "${INSTANCES[@]}"
        systemctl reload nginx.service
    fi
else
    [ "${#STALE[@]}" -eq 0 ] || systemctl disable "${STALE[@]}"
    is_enabled "${UNITS[@]}" || systemctl enable "${UNITS[@]}"
    command -v nginx >/dev/null && nginx -t
    note "systemd is not running (no /run/systemd/system): units enabled, nothing started or reloaded"
fi

# --- what is left to the operator -------------------------------------------------------

if [ "$CHANGED" -eq 0 ]; then
    note "nothing changed"
fi
cat <<EOF

OrbMesh installed${ROOT:+ under $ROOT}: code in /opt/orbmesh, settings in $ENV_FILE,
choices in $DEPLOY_CONF, nginx on ${NGINX_LISTEN} -> 127.0.0.1:{${API_PORTS}}.
Next:
  1. In $ENV_FILE set ORBMESH_PUBLIC_HOST (the address apps dial for WireGuard)
     and ORBMESH_NAT_UPLINK (the internet-facing interface, for NAT), and replace
     ORBMESH_JWT_SECRET with OrbNET's secret; give OrbNET ORBMESH_API_KEYS.
  2. Allow OrbNET's addresses to the internal endpoints:
       deploy/install.sh --orbnet-allow 198.51.100.7,2001:db8::/64
  3. Replace the self-signed certificate with a real one:
       deploy/install.sh --cert /path/fullchain.pem --key /path/privkey.pem
  4. Open UDP ${ORBMESH_LISTEN_PORT:-51820} (WireGuard), UDP ${ORBMESH_PROBE_PORT:-51822} (the relay's probes) and TCP ${NGINX_LISTEN##*:} (HTTPS) in the host firewall.
  5. systemctl restart orbmesh.target; check: curl -k https://127.0.0.1:${NGINX_LISTEN##*:}/health
EOF
