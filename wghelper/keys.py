"""The helper's WireGuard keys, and the node's IPv6 pool: made once, kept 0600 in a 0700 directory.

A private key never leaves its file except on the stdin of ``wg pubkey``;
wg is given the path (``wg set IF private-key FILE``), never the key.
"""
import base64
import contextlib
import ipaddress
import logging
import os
import stat

from . import settings, validate
from .errors import ConfigError

log = logging.getLogger(__name__)

KEY_FILE = "server.key"
# The key of this server's side of every bridge to an exit (wghelper/bridge.py).
BRIDGE_KEY_FILE = "bridge.key"
# The unique-local /64 clients' IPv6 addresses come from when ORBMESH_POOL6 is auto.
ULA_FILE = "pool6"


def generate_private_key():
    raw = bytearray(os.urandom(32))
    # Curve25519 clamping, as `wg genkey` does.
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    return base64.b64encode(bytes(raw)).decode()


def _ensure_state_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError("state directory %s is not a directory" % path)
    if info.st_uid != os.geteuid():
        raise ConfigError("state directory %s is not owned by uid %d" % (path, os.geteuid()))
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _read(path):
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("%s is not a regular file" % path)
        if info.st_mode & 0o077:
            log.warning("tightening permissions of %s to 0600", path)
            os.fchmod(handle.fileno(), 0o600)
        return handle.read().strip()


def _read_key(path):
    key = _read(path)
    if not validate.PUBLIC_KEY_RE.fullmatch(key):  # a private key has the same shape as a public one
        raise ConfigError("%s does not hold a WireGuard key" % path)
    return key


def _write(path, text):
    # Written to a temporary name and renamed, so a crash never leaves a
    # half-written file where the next start would find it.
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)


def ensure_key(state_dir, cmd, name=KEY_FILE):
    """Return (private key path, public key), creating the key on first start."""
    _ensure_state_dir(state_dir)
    path = os.path.join(state_dir, name)
    try:
        key = _read_key(path)
        log.info("using the key in %s", path)
    except FileNotFoundError:
        key = generate_private_key()
        _write(path, key)
        log.info("generated a new key in %s", path)
    return path, validate.public_key(cmd.public_key(key), "wg pubkey output")


def ensure_ula(state_dir):
    """The node's unique-local /64, made on first start and never changed, so clients keep their addresses.

    RFC 4193: fd, a random 40-bit global ID, subnet 0.
    """
    _ensure_state_dir(state_dir)
    path = os.path.join(state_dir, ULA_FILE)
    if not os.path.lexists(path):
        _write(path, str(ipaddress.IPv6Network((0xfd << 120 | int.from_bytes(os.urandom(5), "big") << 80, 64))))
        log.info("made a new unique-local IPv6 pool in %s", path)
    try:
        pool6 = ipaddress.IPv6Network(_read(path))
        if pool6.prefixlen == 64 and pool6.subnet_of(settings.ULA):
            return pool6
    except ValueError:
        pass
    raise ConfigError("%s does not hold a unique-local /64" % path)
