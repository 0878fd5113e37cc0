"""NAT and forwarding so tunnel clients reach the internet through the uplink.

Only with ORBMESH_NAT_UPLINK set.  The helper owns one nftables table,
``inet ORBMESH_NAT_TABLE``, completely: it is created at start and deleted
at stop, and anything else in a table of that name is replaced.

* postrouting (nat): masquerade traffic from the pool (and ORBMESH_POOL6)
  leaving through the uplink;
* forward (filter, policy accept, so other forwarding on the host is left
  alone): accept WireGuard -> uplink from the pool, accept established and
  related uplink -> WireGuard, drop every other packet forwarded from the
  uplink into the WireGuard interface (clients are not reachable from the
  internet).  An ``accept`` here does not override a drop elsewhere (an
  iptables FORWARD policy of DROP, say): the host's firewall must let the
  traffic through too.

Rules match interface *names* (iifname/oifname), so they keep working when
the watcher re-creates the WireGuard interface.

The table is applied with one ``nft -f -`` whose script creates the table
(a no-op when it exists), deletes it and defines it again: one atomic
transaction, so any number of restarts leaves exactly one copy and a
half-applied ruleset never exists.

Forwarding is switched on per interface (``net.ipv4.conf.IF.forwarding``
for the WireGuard interface and the uplink), never with the global switch.
The values found before are remembered, in memory and in a state file so a
helper that was killed still restores them after its next clean stop.
"""
import ipaddress
import json
import logging
import os
import re

from .commands import CommandFailed
from .settings import IFNAME_RE, NFT_TABLE_RE

log = logging.getLogger(__name__)

STATE_FILE = "nat-state.json"
_SYSCTL_VALUE_RE = re.compile(r"^-?[0-9]{1,10}$")
# `nft delete table` of a table that is not there (LANG=C, set by the Runner).
_NO_TABLE = "No such file or directory"
# sysctl on a key whose interface does not exist.
_NO_KEY = "cannot stat"
_STATE_KEY_RE = re.compile(r"^net/ipv[46]/conf/([A-Za-z0-9_=+.-]{1,15})/forwarding$")


class NatError(Exception):
    """A NAT value is malformed (settings validate first; this is the backstop)."""


def _ifname(name):
    if not isinstance(name, str) or not IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise NatError("bad interface name %r" % (name,))
    return name


def _table(name):
    if not isinstance(name, str) or not NFT_TABLE_RE.fullmatch(name):
        raise NatError("bad nftables table name %r" % (name,))
    return name


def _networks(pool, pool6):
    nets = []
    for net in (pool, pool6):
        if net is None:
            continue
        if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise NatError("bad network %r" % (net,))
        if net not in nets:
            nets.append(net)
    if not nets:
        raise NatError("no pool to masquerade")
    return nets


def _family(net):
    return "ip" if net.version == 4 else "ip6"


def table_definition(table, wg, uplink, pool, pool6=None):
    """The table exactly as `nft list table inet TABLE` prints it back."""
    table, wg, uplink = _table(table), _ifname(wg), _ifname(uplink)
    if wg == uplink:
        raise NatError("uplink and WireGuard interface are both %r" % wg)
    nets = _networks(pool, pool6)
    lines = ["table inet %s {" % table,
             "\tchain postrouting {",
             "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
    lines += ['\t\toifname "%s" %s saddr %s masquerade' % (uplink, _family(n), n) for n in nets]
    lines += ["\t}",
              "",
              "\tchain forward {",
              "\t\ttype filter hook forward priority filter; policy accept;"]
    lines += ['\t\tiifname "%s" oifname "%s" %s saddr %s accept' % (wg, uplink, _family(n), n)
              for n in nets]
    lines += ['\t\tiifname "%s" oifname "%s" ct state established,related accept' % (uplink, wg),
              '\t\tiifname "%s" oifname "%s" drop' % (uplink, wg),
              "\t}",
              "}"]
    return "\n".join(lines) + "\n"


def apply_script(table, wg, uplink, pool, pool6=None):
    """stdin for `nft -f -`: create-if-missing, delete, define; one transaction."""
    definition = table_definition(table, wg, uplink, pool, pool6)
    return "table inet %s {}\ndelete table inet %s\n%s" % (table, table, definition)


def forwarding_keys(wg, uplink, pool, pool6=None):
    """The per-interface forwarding sysctls, '/'-separated.

    '/' because interface names may hold dots ("eth0.100"), which sysctl
    would read as separators in the dotted form.

    IPv6 gets the WireGuard interface only: the kernel forwards IPv6 only
    with net.ipv6.conf.all.forwarding (left to the operator), and a
    per-interface forwarding=1 on the uplink would make it ignore router
    advertisements (accept_ra=1), which can take the server's own IPv6
    default route away.
    """
    wg, uplink = _ifname(wg), _ifname(uplink)
    versions = {n.version for n in _networks(pool, pool6)}
    keys = []
    if 4 in versions:
        keys += ["net/ipv4/conf/%s/forwarding" % wg, "net/ipv4/conf/%s/forwarding" % uplink]
    if 6 in versions:
        keys.append("net/ipv6/conf/%s/forwarding" % wg)
    return keys


class Nat:
    def __init__(self, settings, runner, state_path=None):
        if not settings.nat_uplink:
            raise NatError("ORBMESH_NAT_UPLINK is not set")
        self.table = _table(settings.nat_table)
        self.wg = _ifname(settings.interface)
        self.uplink = _ifname(settings.nat_uplink)
        self.pool, self.pool6 = settings.pool, settings.pool6
        self.runner = runner
        self.state_path = state_path
        self.script = apply_script(self.table, self.wg, self.uplink, self.pool, self.pool6)
        self.keys = forwarding_keys(self.wg, self.uplink, self.pool, self.pool6)
        self.saved = {}  # sysctl key -> value found before we changed it

    # --- start ------------------------------------------------------------

    def apply(self):
        """Rules first, then forwarding: never forward without masquerade."""
        self.runner.nft("-f", "-", stdin=self.script)
        log.info("nat: table inet %s applied: masquerade %s out of %s, forward %s <-> %s",
                 self.table, ", ".join(str(n) for n in _networks(self.pool, self.pool6)),
                 self.uplink, self.wg, self.uplink)
        self.saved = self._load_state()
        for key in self.keys:
            current = self._read(key)
            self.saved.setdefault(key, current)
            self._save_state()  # before the change, so a crash still knows the old value
            if current != "1":
                self._write(key, "1")
            log.info("nat: %s = 1 (was %s)", key, self.saved[key])

    def interface_up(self):
        """Hook for each (re)creation of the WireGuard interface: a new link
        starts with the default forwarding value, so set ours again."""
        for key in self.keys:
            if "/%s/" % self.wg in key and self._read(key) != "1":
                self._write(key, "1")
                log.info("nat: %s = 1 again (interface re-created)", key)

    # --- stop -------------------------------------------------------------

    def remove(self):
        """Forwarding back first, then the table.  Returns False if a step failed
        (each failure is logged; the other steps still run)."""
        ok = True
        for key, value in sorted(self.saved.items()):
            try:
                if self._read(key) != value:
                    self._write(key, value)
                log.info("nat: %s restored to %s", key, value)
            except CommandFailed as exc:
                if _NO_KEY in (exc.stderr or ""):
                    # The interface is gone (say, an old uplink from the state file).
                    log.info("nat: %s is gone; nothing to restore", key)
                else:
                    log.error("nat: cannot restore %s to %s: %s", key, value, exc.stderr)
                    ok = False
        try:
            self.runner.nft("delete", "table", "inet", self.table)
            log.info("nat: table inet %s deleted", self.table)
        except CommandFailed as exc:
            if _NO_TABLE in (exc.stderr or ""):
                log.info("nat: table inet %s was already gone", self.table)
            else:
                log.error("nat: cannot delete table inet %s: %s", self.table, exc.stderr)
                ok = False
        if ok:
            self.saved = {}
            self._clear_state()
        return ok

    # --- sysctl -----------------------------------------------------------
    # Through `sysctl` and the Runner rather than writing /proc/sys here: every
    # change the helper makes to the system then goes through commands.py,
    # with its timeout, LANG=C and an argv the unit tests check exactly.  The
    # cost is one short process per read or write, a few at start and stop.

    def _read(self, key):
        value = self.runner.sysctl("-n", key).strip()
        if not _SYSCTL_VALUE_RE.fullmatch(value):
            raise CommandFailed("sysctl", None, "unexpected value %r for %s" % (value, key))
        return value

    def _write(self, key, value):
        if not _SYSCTL_VALUE_RE.fullmatch(value):
            raise NatError("bad sysctl value %r" % (value,))
        self.runner.sysctl("-w", "%s=%s" % (key, value))

    # --- state file ---------------------------------------------------------

    def _load_state(self):
        """Values saved by a helper that did not stop cleanly, else {}."""
        if not self.state_path:
            return dict(self.saved)
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return dict(self.saved)
        except (OSError, ValueError) as exc:
            log.warning("nat: ignoring unreadable %s: %s", self.state_path, exc)
            return dict(self.saved)
        table = data.get("sysctl") if isinstance(data, dict) else None
        saved = {}
        for key, value in (table.items() if isinstance(table, dict) else ()):
            match = _STATE_KEY_RE.fullmatch(key) if isinstance(key, str) else None
            if (match and match.group(1) not in (".", "..") and isinstance(value, str)
                    and _SYSCTL_VALUE_RE.fullmatch(value)):
                saved[key] = value
        if saved:
            log.info("nat: previous helper did not clean up; original values %s", saved)
        saved.update(self.saved)
        return saved

    def _save_state(self):
        if not self.state_path:
            return
        tmp = self.state_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"sysctl": self.saved}, handle, sort_keys=True)
        os.replace(tmp, self.state_path)

    def _clear_state(self):
        if self.state_path:
            try:
                os.unlink(self.state_path)
            except FileNotFoundError:
                pass
