"""What the helper does for each command of wghelper/requests.py.

dispatch() parses a request's arguments with the contract's checks before
anything runs, then calls the handler, and turns every outcome into a
reply, so nothing escapes to the connection loop.
"""
import logging
import time
from dataclasses import dataclass, field

from . import protocol, requests
from .errors import CommandFailed, HelperError, Invalid
from .peers import Pages, parse_dump, plan_sync
from .statuscache import StatusCache

log = logging.getLogger(__name__)


@dataclass
class Context:
    settings: object
    cmd: object          # wghelper/argv.py Commands
    interface: object    # wghelper/interface.py Interface
    writer: object       # wghelper/writer.py Writer
    public_key: str
    status_cache: StatusCache = field(default_factory=StatusCache)
    bridges: object = None  # wghelper/bridge.py Bridges; None in tests that need none
    samples: object = None  # wghelper/usage.py Samples; None in tests that need none
    pages: Pages = field(default_factory=Pages)


def _require_up(ctx):
    if not ctx.interface.running:
        raise HelperError(protocol.INTERFACE_DOWN, "interface %s is not up" % ctx.interface.name)


def _interface_gone(ctx):
    """Turn a failure caused by a vanished interface into INTERFACE_DOWN."""
    if not ctx.interface.exists():
        raise HelperError(protocol.INTERFACE_DOWN, "interface %s is not there" % ctx.interface.name) from None


def _on_interface(ctx, work):
    """work() with the interface up; a command failing because it vanished is INTERFACE_DOWN."""
    _require_up(ctx)
    try:
        return work()
    except CommandFailed:
        _interface_gone(ctx)
        raise


def _counters(info, peers):
    return {"public_key": info["public_key"], "peer_count": len(peers),
            "rx_bytes": sum(p["rx_bytes"] for p in peers), "tx_bytes": sum(p["tx_bytes"] for p in peers)}


def _dump(ctx, samples=True):
    """parse_dump of the interface now, kept by every reader of the interface: the writer learns its keys
    (Writer.learn), the status cache its counters and the usage samples (unless the caller, Samples.sample,
    keeps it: `samples` False) the peers' counters.  One dump serves them all because on wireguard-go each
    holds the device's IPC lock until it is written out, and every `wg set` waits (0.4-1 s at 60,000 peers)."""
    generation, version = ctx.interface.generation, ctx.writer.version
    taken_at, cached_at, epoch = time.monotonic(), ctx.status_cache.clock(), _epoch(ctx)
    started = time.perf_counter()
    info, peers = parse_dump(ctx.cmd.dump(ctx.interface.name))
    seconds = time.perf_counter() - started
    ctx.writer.learn([p["public_key"] for p in peers], generation, version)
    ctx.status_cache.offer((generation, version), cached_at, _counters(info, peers), seconds)
    if samples and ctx.samples is not None:
        ctx.samples.record(taken_at, epoch, peers, seconds)
    return info, peers


def _peers_now(ctx):
    return _dump(ctx)[1]


def hello(ctx, args):
    s, iface = ctx.settings, ctx.interface
    return {"generation": iface.generation, "interface": iface.name, "public_key": ctx.public_key,
            "backend": iface.backend, "running": bool(iface.running), "listen_port": s.listen_port, "mtu": s.mtu,
            "pool": str(s.pool), "gateway": str(s.gateway),
            # IPv6: null when off.  The app and the DNS resolver learn the node's
            # own unique-local pool here: only root can read where it is kept.
            "pool6": str(s.pool6) if s.pool6 else None, "gateway6": str(s.gateway6) if s.gateway6 else None,
            # Whether clients get IPv6 from them (wghelper/ipv6.py): the interface holds gateway6 in
            # every mode, so the resolver listens there when a restart makes the mode "forward".
            "ipv6": s.ipv6_mode,
            "bridge_public_key": ctx.bridges.public_key if ctx.bridges else None,
            "bridges": ctx.bridges.running() if ctx.bridges else []}


def _epoch(ctx):
    """Which counters a dump's belong to: the link's ifindex (a link made again counts from zero)."""
    return "%s" % ctx.interface.index


def status(ctx, args):
    def live():  # what the interface really uses, read back from wg
        return _counters(*_dump(ctx))

    _require_up(ctx)
    generation = ctx.interface.generation
    count = ctx.writer.peer_count(generation)
    # Read before the dump: see wghelper/statuscache.py for why this keeps peer_count exact.  When the
    # writer knows the count, it is exact without a dump, and only the counters come from a cached one.
    key = (generation, ctx.writer.version if count is None else None)
    result = hello(ctx, args)
    result.update(_on_interface(ctx, lambda: ctx.status_cache.get(key, live)))
    if count is not None:
        result["peer_count"] = count
    result.update({"wg_set_calls": ctx.writer.wg_set_calls, "jobs_applied": ctx.writer.jobs_applied})
    return result


def apply_peers(ctx, args):
    return _on_interface(ctx, lambda: ctx.writer.apply(args["remove"], args["add"]))


def dump_peers(ctx, args):
    if "dump" in args:  # a later page of a walk
        return ctx.pages.page(args["dump"], args["offset"], args["limit"])
    peers = _on_interface(ctx, lambda: _peers_now(ctx))
    if "limit" not in args:
        return {"peers": peers}
    return ctx.pages.page(ctx.pages.keep(peers), 0, args["limit"])  # a walk's first page


def sync_peers(ctx, args):
    def plan():  # on the writer thread: the changes that ran before it are all in changed_since
        return plan_sync(_peers_now(ctx), args["peers"], ctx.writer.changed_since(args.get("since")))

    return _on_interface(ctx, lambda: ctx.writer.run_planned(plan))


def _bridges(ctx):
    if ctx.bridges is None:
        raise HelperError(protocol.INTERFACE_DOWN, "bridge mode is not available in this helper")
    return ctx.bridges


def bridge_up(ctx, args):
    return _bridges(ctx).up(args.pop("slot"), args)


def bridge_down(ctx, args):
    return _bridges(ctx).down(args["slot"])


def bridge_rules(ctx, args):
    return _bridges(ctx).rules(**args)


def limits(ctx, args):
    return ctx.writer.set_limits(args["users"], args["replace"])


def usage(ctx, args):
    if ctx.samples is None:
        raise HelperError(protocol.INTERFACE_DOWN, "usage is not available in this helper")
    dump = lambda: (_epoch(ctx), _dump(ctx, samples=False)[1])  # noqa: E731
    over = ctx.writer.firewall.over_quota if ctx.writer.firewall is not None else None
    answer = _on_interface(ctx, lambda: ctx.samples.sample(dump, args["since"], args["fresh"], over))
    # Whether a dump held every change while it ran: wireguard-go's IPC lock does, the kernel's netlink
    # dump takes its lock a message at a time.  The app spaces its counts by it (app/peers/usage.py).
    return dict(answer, dump_blocks=ctx.interface.backend != "kernel")


HANDLERS = {
    "hello": hello,
    "status": status,
    "apply_peers": apply_peers,
    "dump_peers": dump_peers,
    "sync_peers": sync_peers,
    "bridge_up": bridge_up,
    "bridge_down": bridge_down,
    "bridge_rules": bridge_rules,
    "limits": limits,
    "usage": usage,
}
assert HANDLERS.keys() == requests.COMMANDS.keys(), "every command of the contract has a handler"


def dispatch(ctx, req_id, cmd, args):
    """Run one command; always returns a reply dict."""
    if cmd not in HANDLERS:
        return protocol.error(req_id, protocol.UNKNOWN_COMMAND, "unknown command %r" % cmd[:40])
    own = {ctx.public_key, getattr(ctx.bridges, "public_key", None)}  # no peer or exit may use the helper's keys
    try:
        return protocol.ok(req_id, HANDLERS[cmd](ctx, requests.COMMANDS[cmd](args, ctx.settings, own)))
    except Invalid as exc:
        return protocol.error(req_id, protocol.INVALID_ARGUMENT, str(exc), {"field": exc.field})
    except HelperError as exc:
        return protocol.error(req_id, exc.code, exc.message, exc.details)
    except CommandFailed as exc:
        log.warning("%s for %s failed: exit %s: %s", exc.command, cmd, exc.exit_code, exc.stderr)
        return protocol.error(req_id, protocol.COMMAND_FAILED, "%s failed" % exc.command, exc.details())
    except Exception:
        log.exception("%s failed unexpectedly", cmd)
        return protocol.error(req_id, protocol.INTERNAL, "internal error; see the helper's log")
