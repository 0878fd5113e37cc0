"""orbmesh-wg: operator commands.

    orbmesh-wg token --user U --device D [--ttl SECONDS] [--private-key PEM]

mints a device token the way OrbNET does, from the same settings the app
reads (ORBMESH_CONFIG_FILE and ORBMESH_* variables).

    orbmesh-wg bridge-user

prints the userUuid this server registers under on exits in bridge mode
(from its bridge key, asked of the running helper): what an exit lists in
ORBMESH_SCOPED_API_KEYS as KEY=userUuid for this entry.

    orbmesh-wg relay --transport ws|http --url URL --token TOKEN --listen ADDR:PORT

carries a local WireGuard client's UDP over the server's tunnel: the same
program as the client package's own `orbmesh-relay` command (orbmesh_relay/).

    orbmesh-wg dns-config [--output FILE] [--wait SECONDS | --no-helper] [--username NAME]
    orbmesh-wg dns-config --check-enabled

renders the Unbound config of the node's resolver (app/dns/unbound.py) from the
settings and the running helper's hello (its IPv6 gateway, when it has
one); run as root (or a uid the helper allows) before Unbound starts.
--check-enabled exits 0 when ORBMESH_DNS_RESOLVER is on, 1 when it is off.
"""
import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from orbmesh_relay import cli as relay_cli

from .. import config as settings
from ..api.auth import mint_device_token
from ..bridge.bridges import bridge_user
from ..dns import unbound
from ..failures import Failure
from ..helper import HelperClient, HelperFailed, HelperUnavailable


def _token(args):
    values = settings.load()
    key = None
    if args.private_key:
        key = Path(args.private_key).read_text()
    elif not values["JWT_ALGORITHM"].startswith("HS"):
        raise settings.ConfigError("--private-key is required for %s" % values["JWT_ALGORITHM"])
    else:
        settings.check_secrets(values)
    print(mint_device_token(values, args.user, args.device, ttl=args.ttl, signing_key=key))


def _hello(values, wait):
    """The helper's hello, waiting up to `wait` seconds for its socket (it may be starting too)."""
    client = HelperClient(values["HELPER_SOCKET"], values["HELPER_TIMEOUT"])
    deadline = time.monotonic() + wait
    quiet = logging.getLogger("app.helper")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the caller reports the last failure; not a line per retry
    try:
        while True:
            try:
                return client.hello()
            except HelperUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
    finally:
        quiet.setLevel(level)
        client.close()


def _write(path, text):
    """Replace `path` in one step (0644: Unbound reads it after dropping privileges)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".unbound.conf.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _dns_config(args):
    values = settings.load()
    if args.check_enabled:
        return 0 if values["DNS_RESOLVER"] == "on" else 1
    try:
        hello = None if args.no_helper else _hello(values, args.wait)
    except Failure as exc:
        raise settings.ConfigError("cannot ask the helper at %s for its addresses: %s"
                                   % (values["HELPER_SOCKET"], exc.message)) from None
    text = unbound.from_settings(values, hello, username=args.username)
    if args.output:
        _write(args.output, text)
    else:
        sys.stdout.write(text)


def _bridge_user(args):
    values = settings.load()
    key = HelperClient(values["HELPER_SOCKET"], values["HELPER_TIMEOUT"]).hello().get("bridge_public_key")
    if not key:
        raise OSError("the helper has no bridge key")
    print(bridge_user(key))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="orbmesh-wg", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="mint a device token")
    token.add_argument("--user", required=True)
    token.add_argument("--device", required=True)
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--private-key", help="PEM private key for RS256/ES256/EdDSA")
    token.set_defaults(func=_token)
    commands.add_parser("bridge-user", help="print this server's userUuid on exits (bridge mode)").set_defaults(
        func=_bridge_user)
    relay_parser = commands.add_parser("relay", help="relay local WireGuard UDP over the server's tunnel")
    relay_cli.add_arguments(relay_parser)
    relay_parser.set_defaults(func=relay_cli.run)
    dns = commands.add_parser("dns-config", help="render the Unbound config of the node's resolver")
    dns.add_argument("--output", help="write here (replaced in one step) instead of stdout")
    dns.add_argument("--wait", type=float, default=0, help="seconds to wait for the helper's socket (default 0)")
    dns.add_argument("--no-helper", action="store_true", help="do not ask the helper (no IPv6 gateway)")
    dns.add_argument("--username", default="unbound",
                     help="user Unbound drops to when started as root; '' when started as that user")
    dns.add_argument("--check-enabled", action="store_true", help="exit 0 if ORBMESH_DNS_RESOLVER is on, else 1")
    dns.set_defaults(func=_dns_config)
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except (settings.ConfigError, OSError, ValueError) as exc:
        print("orbmesh-wg: %s" % exc, file=sys.stderr)
        return 2
    except (HelperUnavailable, HelperFailed) as exc:
        print("orbmesh-wg: %s" % exc.message, file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
