"""Bridge (multi-hop) mode: one server-to-server tunnel per exit, and the
policy routing that sends a bridged client's traffic into it.

The app names a bridge by a *slot* (0 to MAX_SLOTS - 1); everything else is
derived here from the helper's own settings, so no interface, table or rule
text ever crosses the socket:

* interface ``<ORBMESH_INTERFACE, cut to fit>b<slot>``: WireGuard, private key
  ``bridge.key`` in the state directory (by path), one peer (the exit) with
  ``allowed-ips 0.0.0.0/0``, address = this server's address in the exit's pool;
* routing table ``ORBMESH_BRIDGE_TABLE_BASE + slot``::

      default dev <interface>                      (metric 0)
      unreachable default metric 4294967295        (the fallback)

  When the interface disappears its route goes with it and the unreachable
  route answers: a bridged client's traffic is dropped, never looked up in
  the main table (which would send it out directly, unhidden);
* nftables ``table ip <ORBMESH_NAT_TABLE>_b<slot>``: masquerade the pool out
  of the interface (the exit only accepts our address in its pool from us),
  and let only replies come back from the exit into the client interface;
* one rule per bridged client: ``ip -4 rule add pref ORBMESH_BRIDGE_RULE_PREF
  from ADDR/32 lookup TABLE``.  Before a rule is added its table gets the
  unreachable fallback, so a rule never points at an empty table.
"""
import ipaddress
import logging
import re
import threading

from . import validate
from .commands import CommandFailed
from .interface import WG_SOCKET_DIR, Interface

log = logging.getLogger(__name__)

MAX_SLOTS = 64
UNREACHABLE_METRIC = "4294967295"
_RULE_RE = re.compile(r"^([0-9]+):\s+from ([0-9.]+)(?:/32)? lookup ([0-9]+)\s*$")
_NO_TABLE = "No such file or directory"


def link_name(interface, slot):
    suffix = "b%d" % slot
    return interface[:15 - len(suffix)] + suffix


def nft_table(nat_table, slot):
    suffix = "_b%d" % slot
    return nat_table[:32 - len(suffix)] + suffix


def nft_script(table, link, wg, pool):
    """stdin for `nft -f -`: create-if-missing, delete, define; one transaction."""
    return "\n".join([
        "table ip %s {}" % table,
        "delete table ip %s" % table,
        "table ip %s {" % table,
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        '\t\toifname "%s" ip saddr %s masquerade' % (link, pool),
        "\t}",
        "",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        '\t\tiifname "%s" oifname "%s" ct state established,related accept' % (link, wg),
        '\t\tiifname "%s" oifname "%s" drop' % (link, wg),
        "\t}",
        "}",
    ]) + "\n"


def parse_rules(text, pref):
    """`ip -4 rule show pref P` -> {client address: table}; other lines ignored."""
    rules = {}
    for line in text.splitlines():
        match = _RULE_RE.match(line.strip())
        if match and int(match.group(1)) == pref:
            rules[str(ipaddress.IPv4Address(match.group(2)))] = int(match.group(3))
    return rules


class BridgeLink(Interface):
    """The WireGuard interface of one bridge; bring-up and teardown as for wg0."""

    def __init__(self, bridges, slot):
        super().__init__(bridges.settings, bridges.runner, bridges.key_path, bridges.socket_dir)
        self.name = link_name(bridges.settings.interface, slot)
        self.slot = slot
        self.table = str(bridges.settings.bridge_table_base + slot)
        self.nft_table = nft_table(bridges.settings.nat_table, slot)
        self.spec = None

    def _configure(self):
        s, spec, run = self.settings, self.spec, self.runner
        # Only the exit stays a peer (an adopted link may hold an older one).
        for key in run.wg("show", self.name, "peers").split():
            if key != spec["public_key"]:
                run.wg("set", self.name, "peer", validate.public_key(key, "peer"), "remove")
        run.wg("set", self.name, "private-key", self.key_path, "peer", spec["public_key"],
               "endpoint", spec["endpoint"], "allowed-ips", "0.0.0.0/0",
               "persistent-keepalive", str(spec["keepalive"]))
        run.ip("-4", "address", "flush", "dev", self.name)
        run.ip("-4", "address", "add", spec["address"] + "/32", "dev", self.name)
        run.ip("link", "set", "dev", self.name, "mtu", str(s.mtu), "up")
        # Forwarding is judged on the incoming interface: clients come in on
        # wg0, their replies on the bridge.  Per interface, never ip_forward.
        for ifname in (s.interface, self.name):
            run.sysctl("-w", "net/ipv4/conf/%s/forwarding=1" % ifname)
        run.nft("-f", "-", stdin=nft_script(self.nft_table, self.name, s.interface, s.pool))
        run.ip("-4", "route", "replace", "default", "dev", self.name, "table", self.table)
        run.ip("-4", "route", "replace", "unreachable", "default", "metric", UNREACHABLE_METRIC,
               "table", self.table)


class Bridges:
    def __init__(self, settings, runner, key_path, public_key, socket_dir=WG_SOCKET_DIR):
        self.settings = settings
        self.runner = runner
        self.key_path = key_path
        self.public_key = public_key
        self.socket_dir = socket_dir
        self.links = {}  # slot -> BridgeLink
        self._lock = threading.Lock()

    def table(self, slot):
        return str(self.settings.bridge_table_base + slot)

    def running(self):
        return sorted(slot for slot, link in self.links.items() if link.running)

    # --- bridges ------------------------------------------------------------

    def up(self, slot, spec):
        """Create or update the bridge of `slot`; a no-op when it is up as asked."""
        with self._lock:
            link = self.links.get(slot)
            if link is None:
                link = self.links[slot] = BridgeLink(self, slot)
            if not (link.running and link.spec == spec and link.exists()):
                link.spec = spec
                link.running = False
                link.up()
                log.info("bridge %s up: table %s, exit %s, address %s", link.name, link.table,
                         spec["endpoint"], spec["address"])
            return {"interface": link.name, "table": int(link.table), "public_key": self.public_key}

    def down(self, slot):
        """Remove the bridge of `slot` and everything that points at it."""
        with self._lock:
            link = self.links.pop(slot, None) or BridgeLink(self, slot)
            table = link.table
            for address, target in self._rules().items():
                if str(target) == table:
                    self._del_rule(address)
            self.runner.ip("-4", "route", "flush", "table", table)
            try:
                self.runner.nft("delete", "table", "ip", link.nft_table)
            except CommandFailed as exc:
                if _NO_TABLE not in (exc.stderr or ""):
                    raise
            link.down()
            log.info("bridge %s down (table %s)", link.name, table)
            return {"interface": link.name}

    def stop(self):
        """At helper stop: take down every bridge this helper brought up."""
        for slot in sorted(self.links):
            try:
                self.down(slot)
            except CommandFailed as exc:
                log.error("could not take down bridge slot %d: %s", slot, exc)

    # --- client rules ---------------------------------------------------------

    def rules(self, add, remove, exclusive=False):
        """Point clients at bridges: `add` {address: slot}, `remove` [address].

        With `exclusive`, every other rule at our priority goes too (the
        app's reconcile sends the complete set).
        """
        with self._lock:
            current = self._rules()
            wanted = {address: int(self.table(slot)) for address, slot in add.items()}
            drop = set(remove) & set(current)
            if exclusive:
                drop |= set(current) - set(wanted)
            drop |= {a for a in wanted if a in current and current[a] != wanted[a]}
            for address in sorted(drop):
                self._del_rule(address)
            added = 0
            for address, table in sorted(wanted.items()):
                if current.get(address) == table and address not in drop:
                    continue
                self.runner.ip("-4", "route", "replace", "unreachable", "default", "metric",
                               UNREACHABLE_METRIC, "table", str(table))
                self.runner.ip("-4", "rule", "add", "pref", str(self.settings.bridge_rule_pref),
                               "from", address + "/32", "lookup", str(table))
                added += 1
            return {"added": added, "removed": len(drop - set(wanted)),
                    "rules": len(wanted) + len(set(current) - drop - set(wanted))}

    def _rules(self):
        pref = self.settings.bridge_rule_pref
        return parse_rules(self.runner.ip("-4", "rule", "show", "pref", str(pref)), pref)

    def _del_rule(self, address):
        self.runner.ip("-4", "rule", "del", "pref", str(self.settings.bridge_rule_pref),
                       "from", address + "/32")
