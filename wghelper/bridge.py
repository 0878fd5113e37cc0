"""Bridge (multi-hop) mode: one server-to-server tunnel per exit, and the
policy routing that sends a bridged client's traffic into it.

The app names a bridge by a *slot* (0 to MAX_BRIDGE_SLOTS - 1); everything
else is derived here from the helper's own settings, so no interface,
table or rule text ever crosses the socket:

* interface ``<ORBMESH_INTERFACE, cut to fit>b<slot>``: WireGuard, private key
  ``bridge.key`` in the state directory (by path), one peer (the exit) with
  ``allowed-ips 0.0.0.0/0``, address = this server's address in the exit's pool
  (inside ORBMESH_BRIDGE_NETWORKS, and neither local nor on a connected network
  already).  The helper refuses to start when a name would be
  ORBMESH_INTERFACE or ORBMESH_NAT_UPLINK, and never adopts, changes or
  deletes a link of that name whose key is not the bridge key;
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

from .errors import CommandFailed, ConfigError, Invalid
from .interface import WG_SOCKET_DIR, Interface
from .peers import parse_dump
from .protocol import MAX_BRIDGE_SLOTS

log = logging.getLogger(__name__)

_RULE_RE = re.compile(r"^\s*([0-9]+):\s+from ([0-9.]+)(?:/32)? lookup ([0-9]+)\s*$", re.M)


def link_name(interface, slot):
    suffix = "b%d" % slot
    return interface[:15 - len(suffix)] + suffix


def connected(text, skip):
    """`ip -4 -o address show` -> the networks of every address (and point-to-point peer) not on the links `skip`."""
    return [ipaddress.ip_network(b, strict=False) for words in map(str.split, text.splitlines())
            if len(words) > 3 and words[1] not in skip for a, b in zip(words, words[1:]) if a in ("inet", "peer")]


def parse_rules(text, pref):
    """`ip -4 rule show pref P` -> {client address: table}; other lines ignored."""
    return {str(ipaddress.IPv4Address(a)): int(t) for p, a, t in _RULE_RE.findall(text) if int(p) == pref}


class BridgeLink(Interface):
    """The WireGuard interface of one bridge; bring-up and teardown as for wg0."""

    def __init__(self, bridges, slot):
        s = bridges.settings
        super().__init__(s, bridges.cmd, bridges.key_path, socket_dir=bridges.socket_dir,
                         name=link_name(s.interface, slot))
        self.bridges = bridges
        self.table = s.bridge_table_base + slot
        self.spec = None

    def foreign(self):
        """Whether a link of this name exists that this helper's bridge key does not run."""
        try:
            return self.exists() and parse_dump(self.cmd.dump(self.name))[0]["public_key"] != self.bridges.public_key
        except (CommandFailed, ValueError):  # not WireGuard
            return True

    def up(self):
        if self.foreign():
            raise CommandFailed("ip", None, "%s exists and is not this helper's bridge; left alone" % self.name)
        super().up()

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
        clash = {link_name(settings.interface, n) for n in range(MAX_BRIDGE_SLOTS)} & {settings.interface,
                                                                                        settings.nat_uplink}
        if clash:
            raise ConfigError("ORBMESH_INTERFACE: a bridge link would be named %s too; choose another" % clash.pop())

    def running(self):
        return sorted(slot for slot, link in self.links.items() if link.running)

    def apply_firewall(self, also=None):
        self.firewall.apply({link.name for link in self.links.values() if link.running} | ({also} if also else set()))

    def up(self, slot, spec):
        """Create or update the bridge of `slot`; a no-op when it is up as asked."""
        with self._lock:
            link = self.links.get(slot) or self.links.setdefault(slot, BridgeLink(self, slot))
            if not (link.running and link.spec == spec and link.exists()):
                # Exits may well give us the same address: our bridge links do not count.
                ours = {other.name for other in self.links.values() if other.running} | {link.name}
                if any(ipaddress.IPv4Address(spec["address"]) in net for net in connected(self.cmd.addresses(), ours)):
                    raise Invalid("address", "is local or on a connected network of this host")
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
            if link.running or not link.foreign():
                link.down()
            self.apply_firewall()
            log.info("bridge %s down (table %s)", link.name, link.table)
            return {"interface": link.name}

    def adopt(self):
        """At start: the links a helper before us left up (ours: they run our bridge key), so that the
        first firewall ruleset still masquerades them; returns their names.  The app's next reconcile
        sends their specs (bridge_up) again."""
        names = {line.split(": ")[1].split("@")[0] for line in self.cmd.links().splitlines() if ": " in line}
        for slot in range(MAX_BRIDGE_SLOTS):
            link = BridgeLink(self, slot)
            if link.name in names and not link.foreign():
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
            new = sorted((a, t) for a, t in wanted.items() if current.get(a) != t or a in drop)
            for address, table in new:
                self.cmd.route_unreachable(table)
                self.cmd.add_rule(pref, address, table)
            return {"added": len(new), "removed": len(drop - set(wanted)),
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
