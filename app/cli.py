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
"""
import argparse
import sys
from pathlib import Path

from orbmesh_relay import cli as relay_cli

from . import config as settings
from .auth import mint_device_token
from .bridges import bridge_user
from .helper import HelperClient, HelperFailed, HelperUnavailable


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
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except (settings.ConfigError, OSError) as exc:
        print("orbmesh-wg: %s" % exc, file=sys.stderr)
        return 2
    except (HelperUnavailable, HelperFailed) as exc:
        print("orbmesh-wg: %s" % exc.message, file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
