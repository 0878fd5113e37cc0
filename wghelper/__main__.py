"""orbmesh-wghelper: the root process that alone runs wg, ip, nft and sysctl.

`orbmesh-wghelper` serves the app until SIGTERM, and then leaves the
interface, its peers, the bridges and the NAT table as they are: clients keep
their sessions, and the next start adopts them.  `orbmesh-wghelper down`
(with the helper stopped) removes all of it, the table last.
"""
import argparse
import ctypes
import logging
import os
import signal
import sys

from . import ipv6, keys, settings
from .argv import Commands, Runner
from .bridge import Bridges
from .errors import CommandFailed, ConfigError
from .firewall import STATE_FILE, Firewall
from .handlers import Context
from .interface import Interface
from .server import Server
from .usage import Samples, read_boot_id
from .writer import Writer

log = logging.getLogger("wghelper")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_buffers():
    """Every allocation of 1 MB or more mapped on its own, and so unmapped when freed.

    glibc maps a large block on its own only above a threshold that rises to the size of each such block
    freed (up to 32 MB): after the first 60,000-peer dump (10-18 MB of text), each later one came from
    the heap and its pages stayed when it was freed.  The helper grew by about 12.5 MB a minute at
    60,000 peers (bench/rss_growth.py: 170 -> 218 MB in 5 minutes; 101 -> 111 MB with this).
    A fixed threshold also stops the sliding.
    """
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: its own allocator, left as it is
        pass


def main(argv=None):
    map_large_buffers()
    parser = argparse.ArgumentParser(prog="orbmesh-wghelper",
                                     description="Privileged helper: manages the WireGuard interface for the OrbMesh app.")
    parser.add_argument("action", nargs="?", choices=("run", "down"), default="run",
                        help="run (the default): serve the app; down: remove the interface, bridges and NAT")
    parser.add_argument("--config", metavar="FILE", help="KEY=VALUE settings file (sets ORBMESH_CONFIG_FILE)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    opts = parser.parse_args(argv)
    logging.basicConfig(level=opts.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sh").setLevel(logging.WARNING)  # sh logs every command line at INFO; ours are ours to log
    try:
        cfg = settings.load(dict(os.environ, **({settings.PREFIX + "CONFIG_FILE": opts.config} if opts.config else {})))
    except ConfigError as exc:
        print("orbmesh-wghelper: %s" % exc, file=sys.stderr)
        return 2
    runner = Runner(cfg.helper_command_timeout, cfg.wireguard_go)
    cmd = Commands(runner)
    firewall = Firewall(cfg, cmd, os.path.join(cfg.helper_state_dir, STATE_FILE))
    try:
        return (down if opts.action == "down" else run)(cfg, cmd, firewall)
    finally:
        runner.close()


def run(cfg, cmd, firewall):
    server = iface = writer = None
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)
        if server is not None:
            server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        key_path, public_key = keys.ensure_key(cfg.helper_state_dir, cmd)
        if cfg.pool6 == settings.AUTO:
            cfg["POOL6"] = keys.ensure_ula(cfg.helper_state_dir)
        log.info("server public key %s, IPv6 pool %s", public_key, cfg.pool6 or "off")
        cfg["IPV6_MODE"] = ipv6.decide(cfg, cmd)  # before anything is served: hello names it
        bridges = Bridges(cfg, cmd, firewall, *keys.ensure_key(cfg.helper_state_dir, cmd, keys.BRIDGE_KEY_FILE))
        iface = Interface(cfg, cmd, key_path, public_key)
        # Fail closed: the filter before the interface it guards, forwarding only once both are there.
        # If either fails the helper does not run, and the table stays.
        firewall.start(bridges.adopt())
        iface.up()
        firewall.forward()
        iface.on_up = firewall.reapply
        writer = Writer(cmd, cfg.interface, firewall)
        writer.start()
        iface.start_watcher()
        server = Server(cfg, Context(cfg, cmd, iface, writer, public_key, bridges=bridges,
                                     samples=Samples(read_boot_id())))
        server.bind()
        if stopping:
            server.stop()
        server.serve_forever()
        log.info("stopping on signal %s; the interface and its clients stay", stopping[0] if stopping else "?")
    except (CommandFailed, ConfigError, OSError) as exc:
        log.error("cannot run: %s", exc)
        code = 1
    finally:
        if server is not None:
            server.close()
        for part in (writer, iface):
            if part is not None:
                part.stop()
    return code


def down(cfg, cmd, firewall):
    """Remove the bridges and the interface, then the table, then forwarding back as it was: in the
    reverse order of a start, so the filter outlives every link it guards (a failure stops there)."""
    try:
        Server(cfg, None).remove_stale()  # refuses while a helper answers: it would re-create the interface
        Bridges(cfg, cmd, firewall, *keys.ensure_key(cfg.helper_state_dir, cmd, keys.BRIDGE_KEY_FILE)).remove_all()
        Interface(cfg, cmd, None).down()
    except (CommandFailed, OSError) as exc:
        log.error("down: %s; the table and forwarding stay", exc)
        return 1
    return 0 if firewall.stop() else 1


if __name__ == "__main__":
    sys.exit(main())
