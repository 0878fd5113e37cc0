"""The fixed table of commands the app may send, and their checks.

Every handler validates all of its arguments (unknown keys are refused)
before any argv is built, then returns a JSON-able result or raises.
dispatch() turns every outcome into a reply, so nothing escapes to the
connection loop.
"""
import ipaddress
import logging
from dataclasses import dataclass, field

from . import bridge, protocol, validate
from .commands import CommandFailed
from .statuscache import StatusCache
from .writer import WriterStopped

log = logging.getLogger(__name__)


class HelperError(Exception):
    def __init__(self, code, message, details=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass
class Context:
    settings: object
    runner: object
    interface: object
    writer: object
    public_key: str
    status_cache: StatusCache = field(default_factory=StatusCache)
    bridges: object = None  # wghelper/bridge.py Bridges; None in tests that need none


def _args(args, allowed=(), required=()):
    unknown = set(args) - set(allowed)
    if unknown:
        raise validate.Invalid(sorted(str(k)[:40] for k in unknown)[0], "unknown argument")
    for name in required:
        if name not in args:
            raise validate.Invalid(name, "is required")


def _require_up(ctx):
    if not ctx.interface.running:
        raise HelperError(protocol.INTERFACE_DOWN,
                          "interface %s is not up" % ctx.interface.name)


def _wg_show_dump(ctx):
    try:
        return ctx.runner.wg("show", ctx.interface.name, "dump")
    except CommandFailed:
        _interface_gone(ctx)
        raise


def _interface_gone(ctx):
    """Turn a failure caused by a vanished interface into INTERFACE_DOWN."""
    if not ctx.interface.exists():
        raise HelperError(protocol.INTERFACE_DOWN,
                          "interface %s is not there" % ctx.interface.name) from None


def parse_dump(text):
    """Parse `wg show IF dump`; returns (interface fields, peers).

    The first line starts with the private key, which is dropped here and
    never returned or logged.
    """
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty wg dump")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise ValueError("unexpected wg dump header")
    info = {
        "public_key": None if head[1] == "(none)" else head[1],
        "listen_port": int(head[2]),
    }
    peers = []
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) != 8:
            raise ValueError("unexpected wg dump peer line")
        peers.append({
            "public_key": f[0],
            "allowed_ips": [] if f[3] == "(none)" else f[3].split(","),
            "endpoint": None if f[2] == "(none)" else f[2],
            "latest_handshake": int(f[4]),
            "rx_bytes": int(f[5]),
            "tx_bytes": int(f[6]),
            "keepalive": 0 if f[7] == "off" else int(f[7]),
        })
    return info, peers


def _differs(have, want):
    try:
        current_ips = {str(ipaddress.ip_network(a, strict=False)) for a in have["allowed_ips"]}
    except ValueError:
        return True
    if current_ips != set(want["allowed_ips"]) or have["keepalive"] != want["keepalive"]:
        return True
    if want["endpoint"] is None:
        return False  # the peer's roamed endpoint is kept
    try:
        return validate.endpoint(have["endpoint"]) != want["endpoint"]
    except validate.Invalid:
        return True


def plan_sync(current, desired):
    """What to remove and add to turn `current` peers into `desired`."""
    have = {p["public_key"]: p for p in current}
    wanted = {p["public_key"] for p in desired}
    removes = [key for key in have if key not in wanted]
    adds = []
    added = updated = 0
    for peer in desired:
        old = have.get(peer["public_key"])
        if old is None:
            added += 1
            adds.append(peer)
        elif _differs(old, peer):
            updated += 1
            adds.append(peer)
    return removes, adds, {"added": added, "removed": len(removes), "updated": updated}


def _peers(ctx, value, field, min_len):
    s = ctx.settings
    return validate.peers(value, s.pool, s.gateway, min=min_len, field=field)


def _write(ctx, removes, adds):
    try:
        return ctx.writer.apply(removes, adds)
    except CommandFailed:
        _interface_gone(ctx)
        raise


# --- the commands ---------------------------------------------------------

def hello(ctx, args):
    _args(args)
    s, iface = ctx.settings, ctx.interface
    return {
        "generation": iface.generation,
        "interface": iface.name,
        "public_key": ctx.public_key,
        "backend": iface.backend,
        "running": bool(iface.running),
        "listen_port": s.listen_port,
        "mtu": s.mtu,
        "pool": str(s.pool),
        "gateway": str(s.gateway),
        "bridge_public_key": ctx.bridges.public_key if ctx.bridges else None,
        "bridges": ctx.bridges.running() if ctx.bridges else [],
    }


def _live_summary(ctx):
    info, peers = parse_dump(_wg_show_dump(ctx))
    return {
        # What the interface really uses, read back from wg.
        "public_key": info["public_key"],
        "peer_count": len(peers),
        "rx_bytes": sum(p["rx_bytes"] for p in peers),
        "tx_bytes": sum(p["tx_bytes"] for p in peers),
    }


def status(ctx, args):
    _args(args)
    _require_up(ctx)
    # Read before the dump: see wghelper/statuscache.py for why this keeps peer_count exact.
    key = (ctx.interface.generation, ctx.writer.version)
    result = hello(ctx, {})
    result.update(ctx.status_cache.get(key, lambda: _live_summary(ctx)))
    result.update({"wg_set_calls": ctx.writer.wg_set_calls, "jobs_applied": ctx.writer.jobs_applied})
    return result


def add_peers(ctx, args):
    _args(args, ("peers",), ("peers",))
    peers = _peers(ctx, args["peers"], "peers", 1)
    _require_up(ctx)
    return {"applied": _write(ctx, [], peers)["applied"]}


def remove_peers(ctx, args):
    _args(args, ("public_keys",), ("public_keys",))
    keys = validate.key_list(args["public_keys"], min=1)
    _require_up(ctx)
    return {"removed": _write(ctx, keys, [])["removed"]}


def apply_peers(ctx, args):
    _args(args, ("remove", "add"))
    keys = validate.key_list(args.get("remove", []), field="remove")
    peers = _peers(ctx, args.get("add", []), "add", 0)
    if not keys and not peers:
        raise validate.Invalid("remove", "remove and add cannot both be empty")
    removing = set(keys)
    for index, peer in enumerate(peers):
        if peer["public_key"] in removing:
            raise validate.Invalid("add[%d].public_key" % index, "is also in remove")
    _require_up(ctx)
    return _write(ctx, keys, peers)


def dump_peers(ctx, args):
    _args(args)
    _require_up(ctx)
    _, peers = parse_dump(_wg_show_dump(ctx))
    return {"peers": peers}


def sync_peers(ctx, args):
    _args(args, ("peers",), ("peers",))
    desired = _peers(ctx, args["peers"], "peers", 0)
    _require_up(ctx)

    def plan():
        _, current = parse_dump(_wg_show_dump(ctx))
        return plan_sync(current, desired)

    try:
        return ctx.writer.run_planned(plan)
    except CommandFailed:
        _interface_gone(ctx)
        raise


def _bridges(ctx):
    if ctx.bridges is None:
        raise HelperError(protocol.INTERFACE_DOWN, "bridge mode is not available in this helper")
    return ctx.bridges


def bridge_up(ctx, args):
    _args(args, ("slot", "public_key", "endpoint", "address", "keepalive"),
          ("slot", "public_key", "endpoint", "address"))
    slot = validate.slot(args["slot"], bridge.MAX_SLOTS)
    spec = {
        "public_key": validate.public_key(args["public_key"]),
        "endpoint": validate.endpoint(args["endpoint"]),
        "address": validate.tunnel_address(args["address"], ctx.settings.pool),
        "keepalive": validate.keepalive(args.get("keepalive", 25)),
    }
    if spec["endpoint"] is None:
        raise validate.Invalid("endpoint", "is required")
    return _bridges(ctx).up(slot, spec)


def bridge_down(ctx, args):
    _args(args, ("slot",), ("slot",))
    return _bridges(ctx).down(validate.slot(args["slot"], bridge.MAX_SLOTS))


def bridge_rules(ctx, args):
    _args(args, ("add", "remove", "exclusive"))
    s = ctx.settings
    add = validate.bridge_rules(args.get("add", []), s.pool, s.gateway, bridge.MAX_SLOTS)
    remove = validate.client_addresses(args.get("remove", []), s.pool, s.gateway)
    exclusive = args.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise validate.Invalid("exclusive", "must be true or false")
    if set(add) & set(remove):
        raise validate.Invalid("remove", "an address is also in add")
    return _bridges(ctx).rules(add, remove, exclusive)


HANDLERS = {
    "hello": hello,
    "status": status,
    "add_peers": add_peers,
    "remove_peers": remove_peers,
    "apply_peers": apply_peers,
    "dump_peers": dump_peers,
    "sync_peers": sync_peers,
    "bridge_up": bridge_up,
    "bridge_down": bridge_down,
    "bridge_rules": bridge_rules,
}


def dispatch(ctx, req_id, cmd, args):
    """Run one command; always returns a reply dict."""
    handler = HANDLERS.get(cmd)
    if handler is None:
        return protocol.error(req_id, protocol.UNKNOWN_COMMAND,
                              "unknown command %r" % cmd[:40])
    try:
        return protocol.ok(req_id, handler(ctx, args))
    except validate.Invalid as exc:
        return protocol.error(req_id, protocol.INVALID_ARGUMENT, str(exc), {"field": exc.field})
    except HelperError as exc:
        return protocol.error(req_id, exc.code, exc.message, exc.details)
    except CommandFailed as exc:
        log.warning("%s for %s failed: exit %s: %s", exc.command, cmd, exc.exit_code, exc.stderr)
        return protocol.error(req_id, protocol.COMMAND_FAILED,
                              "%s failed" % exc.command, exc.details())
    except WriterStopped as exc:
        return protocol.error(req_id, protocol.INTERFACE_DOWN, str(exc))
    except Exception:
        log.exception("%s failed unexpectedly", cmd)
        return protocol.error(req_id, protocol.INTERNAL, "internal error; see the helper's log")
