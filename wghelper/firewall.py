"""The helper's one nftables table, and per-interface forwarding.

The helper owns ``table inet ORBMESH_NAT_TABLE`` completely, and render()
is the only place its rules are written:

* with ORBMESH_NAT_UPLINK: masquerade the pool (and ORBMESH_POOL6) out of
  the uplink; forward clients to the uplink, and from the uplink back into
  the WireGuard interface only what is established or related;
* for each bridge link that is up (wghelper/bridge.py): masquerade the pool
  out of the link (the exit accepts only our address in its pool), and let
  only replies come back from the exit into the WireGuard interface.

The forward chain has policy accept, so other forwarding on the host is
left alone; an ``accept`` here does not override a drop elsewhere (an
iptables FORWARD policy of DROP, say): the host's firewall must let the
traffic through too.  Rules match interface *names*, so they keep working
when the watcher re-creates an interface.

Each change is one ``nft -f -`` whose script creates the table (a no-op
when it exists), deletes it and defines it again: one atomic transaction,
so any number of restarts leaves exactly one copy and a half-applied
ruleset never exists.  With neither an uplink nor a bridge the table is
deleted.

Forwarding is switched on per interface (``net.ipv4.conf.IF.forwarding``),
never with the global switch.  The values found before are remembered in a
state file.  A helper that stops leaves table and forwarding as they are,
for the interface's clients; ``orbmesh-wghelper down`` restores the values
and deletes the table.
"""
import json
import logging
import os
import re

from .errors import CommandFailed

log = logging.getLogger(__name__)

STATE_FILE = "nat-state.json"
_SYSCTL_VALUE_RE = re.compile(r"^-?[0-9]{1,10}$")
_STATE_KEY_RE = re.compile(r"^net/ipv[46]/conf/(?!\.\.?/)[A-Za-z0-9_=+.-]{1,15}/forwarding$")
# `nft delete table` of a table that is not there; sysctl of an interface
# that is not there (LANG=C, set by the Runner).
_NO_TABLE = "No such file or directory"
_NO_KEY = "cannot stat"


def _family(net):
    return "ip" if net.version == 4 else "ip6"


def render(s, links=()):
    """The table exactly as `nft list table inet TABLE` prints it back."""
    wg, uplink = s.interface, s.nat_uplink
    nets = [n for n in (s.pool, s.pool6) if n is not None] if uplink else []
    postrouting = ['oifname "%s" %s saddr %s masquerade' % (uplink, _family(n), n) for n in nets]
    postrouting += ['oifname "%s" ip saddr %s masquerade' % (link, s.pool) for link in links]
    forward = ['iifname "%s" oifname "%s" %s saddr %s accept' % (wg, uplink, _family(n), n) for n in nets]
    for outside in ([uplink] if uplink else []) + list(links):
        forward += ['iifname "%s" oifname "%s" ct state established,related accept' % (outside, wg),
                    'iifname "%s" oifname "%s" drop' % (outside, wg)]
    lines = ["table inet %s {" % s.nat_table,
             "\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
    lines += ["\t\t" + rule for rule in postrouting]
    lines += ["\t}", "", "\tchain forward {", "\t\ttype filter hook forward priority filter; policy accept;"]
    lines += ["\t\t" + rule for rule in forward]
    return "\n".join(lines + ["\t}", "}"]) + "\n"


def script(s, links=()):
    """stdin for `nft -f -`: create-if-missing, delete, define; one transaction."""
    return "table inet %s {}\ndelete table inet %s\n%s" % (s.nat_table, s.nat_table, render(s, links))


def forwarding_keys(s):
    """The per-interface forwarding sysctls, '/'-separated.

    '/' because interface names may hold dots ("eth0.100"), which sysctl
    would read as separators in the dotted form.

    IPv6 gets the WireGuard interface only: the kernel forwards IPv6 only
    with net.ipv6.conf.all.forwarding (left to the operator), and a
    per-interface forwarding=1 on the uplink would make it ignore router
    advertisements (accept_ra=1), which can take the server's own IPv6
    default route away.
    """
    if not s.nat_uplink:
        return []
    keys = ["net/ipv4/conf/%s/forwarding" % name for name in (s.interface, s.nat_uplink)]
    if s.pool6 is not None:
        keys.append("net/ipv6/conf/%s/forwarding" % s.interface)
    return keys


class Firewall:
    def __init__(self, settings, cmd, state_path=None):
        self.s = settings
        self.cmd = cmd
        self.state_path = state_path
        self.links = ()
        self.keys = forwarding_keys(settings)
        self.saved = {}  # sysctl key -> value found before we changed it

    def apply(self, links=None):
        """Write the table for the uplink and the bridge `links` that are up (None: as before)."""
        if links is not None:
            self.links = tuple(sorted(links))
        if self.s.nat_uplink or self.links:
            self.cmd.apply_nft(script(self.s, self.links))
        else:
            self._delete_table()

    def start(self, links=None):
        """Rules (with the bridge `links` that are up; None: as before) first, then
        forwarding: never forward without masquerade.  Fails closed: a failure
        undoes both.  Run again after each re-creation of the interface: a new
        link starts with the default forwarding value."""
        try:
            self._start(links)
        except CommandFailed:
            self.stop()
            raise

    def _start(self, links):
        self.apply(links)
        if not self.s.nat_uplink:
            return
        log.info("nat: table inet %s applied: masquerade %s out of %s, forward %s <-> %s", self.s.nat_table,
                 ", ".join(str(n) for n in (self.s.pool, self.s.pool6) if n is not None),
                 self.s.nat_uplink, self.s.interface, self.s.nat_uplink)
        self.saved = dict(self._load_state(), **self.saved)
        for key in self.keys:
            current = self._read(key)
            self.saved.setdefault(key, current)
            self._save_state()  # before the change, so a crash still knows the old value
            if current != "1":
                self.cmd.write_sysctl(key, "1")
            log.info("nat: %s = 1 (was %s)", key, self.saved[key])

    def stop(self):
        """`orbmesh-wghelper down`, or a failed start: forwarding back to the saved values, then
        the table gone.  Returns False if a step failed (logged; the other steps still run)."""
        ok = True
        self.saved = dict(self._load_state(), **self.saved)
        for key, value in sorted(self.saved.items()):
            try:
                if self._read(key) != value:
                    self.cmd.write_sysctl(key, value)
                log.info("nat: %s restored to %s", key, value)
            except CommandFailed as exc:
                gone = _NO_KEY in exc.stderr  # the interface is gone (say, an old uplink from the state file)
                log.log(logging.INFO if gone else logging.ERROR, "nat: cannot restore %s to %s: %s", key, value,
                        exc.stderr)
                ok = ok and gone
        try:
            self._delete_table()
        except CommandFailed as exc:
            log.error("nat: cannot delete table inet %s: %s", self.s.nat_table, exc.stderr)
            ok = False
        if ok:
            self.saved = {}
            if self.state_path and os.path.exists(self.state_path):
                os.unlink(self.state_path)
        return ok

    def _delete_table(self):
        try:
            self.cmd.delete_nft_table(self.s.nat_table)
            log.info("nat: table inet %s deleted", self.s.nat_table)
        except CommandFailed as exc:
            if _NO_TABLE not in exc.stderr:
                raise

    def _read(self, key):
        value = self.cmd.read_sysctl(key)
        if not _SYSCTL_VALUE_RE.fullmatch(value):
            raise CommandFailed("sysctl", None, "unexpected value %r for %s" % (value, key))
        return value

    def _load_state(self):
        """The values an earlier helper saved (only well-formed forwarding keys)."""
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                table = json.load(handle)["sysctl"]
            saved = {k: v for k, v in table.items() if _STATE_KEY_RE.fullmatch(k) and _SYSCTL_VALUE_RE.fullmatch(v)}
        except (TypeError, FileNotFoundError):  # no state path, or no file
            return {}
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            log.warning("nat: ignoring unreadable %s: %s", self.state_path, exc)
            return {}
        return saved

    def _save_state(self):
        if self.state_path:
            tmp = self.state_path + ".tmp"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                json.dump({"sysctl": self.saved}, handle, sort_keys=True)
            os.replace(tmp, self.state_path)
