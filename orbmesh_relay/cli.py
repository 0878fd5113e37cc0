"""The orbmesh-relay command: options, signals and the status printer.

add_arguments() and run() are also what the server's ``orbmesh-wg relay``
uses, so both commands take the same options and behave the same; messages
name whichever command was run.  Usage, the status line and exit statuses
are in the package docstring.
"""
import argparse
import logging
import os
import re
import signal
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit

from .common import TOKEN_ENV
from .relay import MODES, Relay
from .udp import parse_endpoint

log = logging.getLogger(__name__)

DESCRIPTION = "carry a local WireGuard client's UDP over an OrbMesh server's tunnel"
SESSION_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")


def base_url(text):
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--url must be http://HOST[:PORT] or https://HOST[:PORT]")
    if parts.query or parts.fragment:
        raise ValueError("--url takes no query or fragment")
    parts.port  # raises ValueError on a bad port
    return text


def parse_listen(text):
    """'127.0.0.1:PORT' or '[::1]:PORT' -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", text)
    if not match:
        raise ValueError("--listen must be IPV4:PORT or [IPV6]:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError("--listen port out of range")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise ValueError("--listen has a bad address %r" % host) from None
    return host, port


def tls_context(insecure=False, ca_file=None):
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file)


def _arg(parse):
    # argparse shows an ArgumentTypeError's own message; a plain ValueError
    # would become a bare "invalid value".
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _session(text):
    if not SESSION_RE.match(text):
        raise ValueError("--session must match [A-Za-z0-9_-]{1,64}")
    return text


def _senders(text):
    value = int(text)
    if not 1 <= value <= 64:
        raise ValueError("--http-senders must be 1 to 64")
    return value


def _interval(text):
    value = float(text)
    if value < 0:
        raise ValueError("--status-interval must be >= 0")
    return value


def add_arguments(parser):
    """The relay's options, on its own parser or on a subcommand's."""
    # The parser's prog ("orbmesh-relay" or "orbmesh-wg relay") prefixes
    # run()'s messages, as argparse's own errors are prefixed.
    parser.set_defaults(relay_prog=parser.prog)
    parser.add_argument("--transport", choices=MODES, required=True,
                        help="auto: the best path now (UDP, else WebSocket, else HTTP), switching as the "
                             "network changes; or one of them, fixed")
    parser.add_argument("--url", type=_arg(base_url), required=True,
                        help="server base URL, http(s)://HOST:PORT")
    parser.add_argument("--token", help="device token; default: the %s environment variable "
                                        "(keeps it out of the process list)" % TOKEN_ENV)
    parser.add_argument("--listen", type=_arg(parse_listen), required=True,
                        help="local UDP address for WireGuard's Endpoint, IPV4:PORT or [IPV6]:PORT")
    parser.add_argument("--status-interval", type=_arg(_interval), default=60.0, metavar="SECONDS",
                        help="print a status line this often (default 60; 0 = only on SIGUSR1)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    tls.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify the server with")
    parser.add_argument("--http-senders", type=_arg(_senders), default=1, metavar="N",
                        help="HTTP mode: sending requests in flight (default 1)")
    parser.add_argument("--session", type=_arg(_session),
                        help="HTTP mode: X-Tunnel-Session name (default: random per process)")
    parser.add_argument("--endpoint", type=_arg(parse_endpoint), metavar="HOST:PORT",
                        help="udp and auto: the node's WireGuard endpoint (connect's serverEndpoint; "
                             "default: the --url host, port 51820)")
    parser.add_argument("--status-file", metavar="PATH",
                        help="write the JSON status here every second and at each switch")


def run(args):
    """Run until SIGTERM/SIGINT (0) or a refused token (2)."""
    prog = args.relay_prog
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print("%s: no token: pass --token or set %s" % (prog, TOKEN_ENV), file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.insecure:
        print("%s: WARNING: --insecure: the server's certificate is not verified" % prog,
              file=sys.stderr, flush=True)
    context = None
    if urlsplit(args.url).scheme == "https":
        context = tls_context(args.insecure, args.ca_file)
    relay = Relay(args.transport, args.url, token, args.listen, ssl_context=context,
                  http_senders=args.http_senders, session=args.session, endpoint=args.endpoint,
                  status_file=args.status_file)
    log.info("listening on udp %s port %d, relaying to %s over %s",
             *relay.local.address, args.url, args.transport)

    # Handlers only set flags: the main thread acts on them between sleeps,
    # so nothing that takes a lock ever runs inside a signal handler.
    flags = {"stop": False, "status": False}

    def on_stop(signum, frame):
        flags["stop"] = True

    def on_status(signum, frame):
        flags["status"] = True

    # Windows has no SIGUSR1: there the status comes every --status-interval and from --status-file.
    handlers = [(signal.SIGTERM, on_stop), (signal.SIGINT, on_stop)]
    if hasattr(signal, "SIGUSR1"):
        handlers.append((signal.SIGUSR1, on_status))
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers}
    try:
        relay.start()
        interval = args.status_interval
        due = time.monotonic() + interval
        while not flags["stop"] and not relay.stopping.is_set():
            if flags["status"] or (interval and time.monotonic() >= due):
                flags["status"] = False
                if interval and time.monotonic() >= due:
                    due = time.monotonic() + interval
                print(relay.status_line(), flush=True)
            time.sleep(0.1)
        relay.stop()
        print(relay.status_line(), flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if relay.fatal:
        print("%s: %s" % (prog, relay.fatal), file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv=None):
    """The orbmesh-relay console script."""
    parser = argparse.ArgumentParser(prog="orbmesh-relay", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except OSError as exc:
        # --listen address in use or not local, unreadable --ca-file: a
        # message and status 2, as `orbmesh-wg relay` has always given.
        print("%s: %s" % (args.relay_prog, exc), file=sys.stderr)
        return 2
