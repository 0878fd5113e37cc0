"""Bridge (multi-hop) mode: one server-to-server tunnel per exit, and the
policy routing that sends a bridged client's traffic into it.

The app names a bridge by a *slot* (0 to MAX_BRIDGE_SLOTS - 1); everything
else is derived here from the helper's own settings, so no interface,
table or rule text ever crosses the socket:

* interface ``<ORBMESH_INTERFACE, cut to fit>b<slot>``: WireGuard, private key
  ``bridge.key`` in the state directory (by path), one peer (the exit) with
  ``allowed-ips 0.0.0.0/0``, address = this server's address in the exit's pool;
* routing table ``ORBMESH_BRIDGE_TABLE_BASE + slot``::

      default dev <interface>                      (metric 0)
      unreachable default metric 4294967295        (the fallback)

  When the interface disappears its route goes with it and the unreachable
  route answers: a bridged client's traffic is dropped, never looked up in
  the main table (which would send it out directly, unhidden);
* the link's masquerade and reply-only rules in the helper's nftables
  table (wghelper/firewall.py);
* one rule per bridged client: ``ip -4 rule add pref ORBMESH_BRIDGE_RULE_PREF
  from ADDR/32 lookup TABLE``.  Before a rule is added its table gets the
  unreachable fallback, so a rule never points at an empty table.
"""
import ipaddress
import logging
import re
import threading

from .errors import CommandFailed
from .interface import WG_SOCKET_DIR, Interface
from .protocol import MAX_BRIDGE_SLOTS

log = logging.getLogger(__name__)

_RULE_RE = re.compile(r"^([0-9]+):\s+from ([0-9.]+)(?:/32)? lookup ([0-9]+)\s*$")


def link_name(interface, slot):
    suffix = "b%d" % slot
    return interface[:15 - len(suffix)] + suffix


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
        s = bridges.settings
        super().__init__(s, bridges.cmd, bridges.key_path, socket_dir=bridges.socket_dir,
                         name=link_name(s.interface, slot))
        self.bridges = bridges
        self.table = s.bridge_table_base + slot
        self.spec = None

    def _configure(self, adopted):
        spec, cmd = self.spec, self.cmd
        # Only the exit stays a peer (an adopted link may hold an older one).
        stale = [key for key in cmd.peer_keys(self.name) if key != spec["public_key"]]
        if stale:
            cmd.set_peers(self.name, stale, [])
        cmd.set_exit_peer(self.name, self.key_path, spec["public_key"], spec["endpoint"], spec["keepalive"])
        if "inet %s/32 " % spec["address"] not in cmd.addresses(self.name):
            cmd.flush_addresses(self.name)  # an older address would stay beside the new one
        cmd.replace_address(self.name, spec["address"] + "/32")
        cmd.link_up(self.name, self.settings.mtu)
        # Forwarding is judged on the incoming interface: clients come in on
        # wg0, their replies on the bridge.  Per interface, never ip_forward.
        for ifname in (self.settings.interface, self.name):
            cmd.write_sysctl("net/ipv4/conf/%s/forwarding" % ifname, "1")
        # Masquerade before the route: nothing leaves through the link with a client's address.
        self.bridges.apply_firewall(also=self.name)
        cmd.route_default(self.table, self.name)
        cmd.route_unreachable(self.table)


class Bridges:
    def __init__(self, settings, cmd, firewall, key_path, public_key, socket_dir=WG_SOCKET_DIR):
        self.settings = settings
        self.cmd = cmd
        self.firewall = firewall
        self.key_path = key_path
        self.public_key = public_key
        self.socket_dir = socket_dir
        self.links = {}  # slot -> BridgeLink
        self._lock = threading.Lock()

    def running(self):
        return sorted(slot for slot, link in self.links.items() if link.running)

    def apply_firewall(self, also=None):
        self.firewall.apply({link.name for link in self.links.values() if link.running} | ({also} if also else set()))

    def up(self, slot, spec):
        """Create or update the bridge of `slot`; a no-op when it is up as asked."""
        with self._lock:
            link = self.links.get(slot) or self.links.setdefault(slot, BridgeLink(self, slot))
            if not (link.running and link.spec == spec and link.exists()):
                link.spec = spec
                link.running = False
                link.up()
                log.info("bridge %s up: table %s, exit %s, address %s", link.name, link.table,
                         spec["endpoint"], spec["address"])
            return {"interface": link.name, "table": link.table, "public_key": self.public_key}

    def down(self, slot):
        """Remove the bridge of `slot` and everything that points at it."""
        with self._lock:
            link = self.links.pop(slot, None) or BridgeLink(self, slot)
            for address, table in self._rules().items():
                if table == link.table:
                    self.cmd.delete_rule(self.settings.bridge_rule_pref, address)
            self._flush(link.table)
            link.down()
            self.apply_firewall()
            log.info("bridge %s down (table %s)", link.name, link.table)
            return {"interface": link.name}

    def adopt(self):
        """At start: the links a helper before us left up, so that the first
        firewall ruleset still masquerades them; returns their names.  The
        app's next reconcile sends their specs (bridge_up) again."""
        names = {line.split(": ")[1].split("@")[0] for line in self.cmd.links().splitlines() if ": " in line}
        for slot in range(MAX_BRIDGE_SLOTS):
            link = BridgeLink(self, slot)
            if link.name in names:
                link.running = True
                self.links[slot] = link
        return [link.name for link in self.links.values()]

    def remove_all(self):
        """`orbmesh-wghelper down`: every bridge's rules, routing table and link."""
        self.rules({}, [], exclusive=True)
        for slot in range(MAX_BRIDGE_SLOTS):
            self._flush(self.settings.bridge_table_base + slot)
        self.adopt()
        for link in self.links.values():
            link.down()

    def rules(self, add, remove, exclusive=False):
        """Point clients at bridges: `add` {address: slot}, `remove` [address].

        With `exclusive`, every other rule at our priority goes too (the
        app's reconcile sends the complete set).
        """
        pref = self.settings.bridge_rule_pref
        with self._lock:
            current = self._rules()
            wanted = {address: self.settings.bridge_table_base + slot for address, slot in add.items()}
            drop = set(remove) & set(current)
            if exclusive:
                drop |= set(current) - set(wanted)
            drop |= {a for a in wanted if a in current and current[a] != wanted[a]}
            for address in sorted(drop):
                self.cmd.delete_rule(pref, address)
            added = 0
            for address, table in sorted(wanted.items()):
                if current.get(address) == table and address not in drop:
                    continue
                self.cmd.route_unreachable(table)
                self.cmd.add_rule(pref, address, table)
                added += 1
            return {"added": added, "removed": len(drop - set(wanted)),
                    "rules": len(wanted) + len(set(current) - drop - set(wanted))}

    def _flush(self, table):
        try:
            self.cmd.flush_table(table)
        except CommandFailed as exc:
            if "does not exist" not in exc.stderr:  # a table never used, or flushed before
                raise

    def _rules(self):
        pref = self.settings.bridge_rule_pref
        return parse_rules(self.cmd.rules(pref), pref)
