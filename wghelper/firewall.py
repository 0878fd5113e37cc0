"""The helper's one nftables table, and per-interface forwarding.

The helper owns ``table inet ORBMESH_NAT_TABLE`` completely, and render()
is the only place its rules are written.  The table is there whenever the
node can forward a client's packet: with ORBMESH_NAT_UPLINK, with a bridge
link up, or when the host forwards for the WireGuard interface on its own
(``net.ipv4.conf.<IF, or default before it exists>.forwarding``, or
``net.ipv6.conf.all.forwarding`` with an IPv6 pool: a routed prefix needs no
uplink).  It holds:

* with ORBMESH_NAT_UPLINK: masquerade the pool (and ORBMESH_POOL6 when it
  is unique-local) out of the uplink;
* for each bridge link that is up (wghelper/bridge.py): masquerade the pool
  out of the link (the exit accepts only our address in its pool); from
  the link only replies, into the WireGuard interface or the node itself;
* tenant isolation: what comes from clients jumps to ``from_clients``
  (forward) or ``to_node`` (input).  A client reaches the internet, never
  other clients nor what is not the internet (validate.NOT_INTERNET) nor
  the host's connected networks that are not the internet (a public uplink
  subnet is the internet: its other hosts are reachable); out of the
  uplink and its bridge links only, or, without an uplink, out of any
  interface of a family the host itself routes (its ``all.forwarding``).
  Nothing new enters the WireGuard interface from elsewhere.
  ALLOWED_DESTINATIONS and CLIENT_TO_CLIENT open more.  Of the node it
  reaches only the gateway (ping, and DNS with DNS_RESOLVER), the
  CLIENT_API_PORT (so an app disconnects while its full tunnel is up) and
  the CLIENT_NODE_PORTS.  An exit's entry is an ordinary client of its pool;
* speed tiers and quota backstops (wghelper/limits.py), whenever a user has
  one: then the table is there even where the node forwards nothing, with
  those alone.

The hooked chains have policy accept, so other traffic on the host is left
alone; an ``accept`` here does not override a drop elsewhere (an iptables
FORWARD policy of DROP, say): the host's firewall must let the traffic
through too.  Rules match interface *names*, so they keep working when the
watcher re-creates an interface; the table is written again then too.

Each change is one ``nft -f -`` whose script creates the table (a no-op
when it exists), deletes it and defines it again: one atomic transaction,
so any number of restarts leaves exactly one copy and a half-applied
ruleset never exists.  When the node cannot forward at all the table is
deleted (the local run: clients reach the node, nothing beyond).

Fail closed, in this order: the table before the interface is adopted or
created (start), forwarding after (forward).  A failed start never deletes
the table.  A failure to switch forwarding on puts every value the helper
changed back (no forwarding, the table stays); a table that cannot be
written at all leaves an earlier one as it was and takes an existing
WireGuard link down (no packet in or out until a start succeeds).

Forwarding is switched on per interface (``net.ipv4.conf.IF.forwarding``),
never with the global switch, and only with ORBMESH_NAT_UPLINK.  The values
found before are remembered in a state file.  A helper that stops leaves
table and forwarding as they are, for the interface's clients;
``orbmesh-wghelper down``, once the link is gone, deletes the table and
restores the values.
"""
import collections
import ipaddress
import json
import logging
import os
import re
import threading

from . import limits as limits_part
from .errors import CommandFailed
from .settings import ULA
from .validate import NOT_INTERNET, is_internet

log = logging.getLogger(__name__)

STATE_FILE = "nat-state.json"
_SYSCTL_VALUE_RE = re.compile(r"^-?[0-9]{1,10}$")
_STATE_KEY_RE = re.compile(r"^net/ipv[46]/conf/(?!\.\.?/)[A-Za-z0-9_=+.-]{1,15}/forwarding$")
# `nft delete table` of a table that is not there; sysctl of an interface
# that is not there (LANG=C, set by the Runner).
_NO_TABLE = "No such file or directory"
_NO_KEY = "cannot stat"
_ADDRESS_RE = re.compile(r"\binet6? ([0-9a-fA-F.:]+(?:/[0-9]+)?)(?: peer ([0-9a-fA-F.:]+/[0-9]+))?")


def connected(text):
    """The networks of `ip -o address show` (a point-to-point address: its peer's)."""
    return [ipaddress.ip_network(peer or own, strict=False) for own, peer in _ADDRESS_RE.findall(text)]


def blocked(local, version):
    """What a client never reaches unless ALLOWED_DESTINATIONS says so: every range that is not the
    internet, and those of the host's connected networks `local` that are not either."""
    return [n for n in list(NOT_INTERNET) + [n for n in local if not is_internet(n)] if n.version == version]


def _set(elements):
    return elements[0] if len(elements) == 1 else "{ %s }" % ", ".join(elements)


def _addr(a):
    """An address as nft prints it (inet_ntop: an IPv6 address with an IPv4 one inside ends in dotted form)."""
    if a.version == 6 and a.ipv4_mapped is not None:
        return "::ffff:%s" % a.ipv4_mapped
    if a.version == 6 and int(a) >> 32 == 0 and int(a) >> 16:
        return "::%s" % ipaddress.IPv4Address(int(a))
    return str(a)


def _nets(nets):
    """Networks of one family as nft lists a set of them: overlapping ones
    merged, sorted, adjacent ones that form no prefix as a range, a single
    address bare."""
    runs = []
    for n in ipaddress.collapse_addresses(nets):
        if runs and n.network_address == runs[-1][-1].broadcast_address + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return _set(["%s-%s" % (_addr(r[0].network_address), _addr(r[-1].broadcast_address)) if len(r) > 1
                 else _addr(r[0].network_address) if r[0].num_addresses == 1
                 else "%s/%d" % (_addr(r[0].network_address), r[0].prefixlen) for r in runs])


def render(s, links=(), local=(), routed=(), limits=None, isolating=True):
    """The table exactly as `nft list table inet TABLE` prints it back; `local`: the host's connected
    networks; `routed`: the IP versions (4, 6) the host forwards on its own, which clients may leave by
    any interface when there is no uplink; `limits`: the speed tiers and quotas (a wghelper/limits.py
    View; nft prints those back in its own units and wraps their element lists); not `isolating`: the
    node forwards nothing, and the table holds the limits alone."""
    wg, links = s.interface, list(links)
    uplink = [s.nat_uplink] if s.nat_uplink else []
    fams = [("ip", "icmp", s.pool, s.gateway, uplink + links)]
    if s.pool6 is not None:  # bridged clients have no IPv6 (their peers carry no /128)
        fams.append(("ip6", "icmpv6", s.pool6, s.gateway6, uplink))
    nat, node, clients = [], ["ct state established,related accept"], []
    for f, icmp, pool, gateway, exits in fams:
        # A routed IPv6 prefix is reachable as it is: only IPv4 and unique-local pools are hidden.
        if pool.version == 4 or pool.subnet_of(ULA):
            nat += ['oifname "%s" %s saddr %s masquerade' % (out, f, pool) for out in exits]
        node.append("%s daddr %s %s type echo-request accept" % (f, gateway, icmp))
        if s.dns_resolver == "on":
            node.append("%s daddr %s meta l4proto { tcp, udp } th dport 53 accept" % (f, gateway))
        opened = [n for n in s.allowed_destinations or () if n.version == pool.version]
        clients += ["%s daddr %s accept" % (f, _nets(opened))] if opened else []
        clients += ['oifname "%s" %s daddr %s accept' % (wg, f, pool)] if s.client_to_client == "on" else []
        clients.append("%s daddr %s drop" % (f, _nets(blocked(local, pool.version))))
        clients += ['oifname "%s" %s saddr %s accept' % (out, f, pool) for out in exits]
        if not uplink and pool.version in routed:
            clients.append('oifname != "%s" %s saddr %s accept' % (wg, f, pool))
    ports = set(s.client_node_ports or ()) | ({s.client_api_port} if s.client_api_port else set())
    if ports:
        node.append("tcp dport %s accept" % _set([str(p) for p in sorted(ports)]))
    forward, inputs = ['iifname "%s" jump from_clients' % wg], ['iifname "%s" jump to_node' % wg]
    for link in links:  # from an exit only replies, into the clients or the entry itself
        forward += ['iifname "%s" oifname "%s" ct state established,related accept' % (link, wg),
                    'iifname "%s" drop' % link]
        inputs += ['iifname "%s" ct state established,related accept' % link, 'iifname "%s" drop' % link]
    # Clients are reachable from nowhere: into the WireGuard interface only replies.
    forward += ['oifname "%s" ct state established,related accept' % wg, 'oifname "%s" drop' % wg]
    hook = "type %s hook %s priority %s; policy accept;"
    limited = limits is not None and not limits.empty
    lines = ["table inet %s {" % s.nat_table] + (limits_part.objects(limits) if limited else [])
    for name, head, rules in [("postrouting", hook % ("nat", "postrouting", "srcnat"), nat),
                              ("input", hook % ("filter", "input", "filter"), inputs),
                              ("forward", hook % ("filter", "forward", "filter"), forward),
                              ("to_node", None, node + ["drop"]), ("from_clients", None, clients + ["drop"])]:
        if isolating:
            lines += ["\tchain %s {" % name] + ["\t\t" + r for r in ([head] if head else []) + rules] + ["\t}", ""]
    lines += limits_part.chains(limits, wg) if limited else []
    return "\n".join(lines[:-1] + ["}"]) + "\n"


def script(s, links=(), local=(), routed=(), limits=None, isolating=True):
    """stdin for `nft -f -`: create-if-missing, delete, define; one transaction."""
    return "table inet %s {}\ndelete table inet %s\n%s" % (s.nat_table, s.nat_table,
                                                          render(s, links, local, routed, limits, isolating))


class _Owners:
    """{address: user} seen through changes not yet made to it (None: gone); commit() makes them.  A
    limits request at 10,000 users changes a few addresses: no copy of the whole index."""

    def __init__(self, base):
        self.base, self.changes = base, {}

    def get(self, address, default=None):
        value = self.changes[address] if address in self.changes else self.base.get(address)
        return default if value is None else value

    def __contains__(self, address):
        return self.get(address) is not None

    def __getitem__(self, address):
        value = self.get(address)
        if value is None:
            raise KeyError(address)
        return value

    def moved(self, before, after, touched):
        """The `touched` users' plans went from `before` to `after`."""
        for user in touched:
            for address in before[user].addresses if user in before else ():
                if self.get(address) == user:
                    self.changes[address] = None
        for user in touched:
            for address in after[user].addresses if user in after else ():
                self.changes[address] = user

    def commit(self):
        for address, user in self.changes.items():
            if user is None:
                self.base.pop(address, None)
            else:
                self.base[address] = user
        self.changes = {}
        return self.base


def forwarding_keys(s):
    """The per-interface forwarding sysctls the helper switches on, '/'-separated.

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
        self._lock = threading.Lock()  # the watcher, bridge and limits commands all apply
        self.plans = {}  # user -> limits.Plan: the tiers and quotas the app asked for
        self.owners = {}  # address -> user, of self.plans
        self.written = limits_part.view({})  # what the kernel's table holds of them (and its rates)

    def apply(self, links=None):
        """Write the table for the uplink, the bridge `links` that are up (None: as before) and the limits,
        or delete it when the node cannot forward a client's packet and no user has a limit."""
        with self._lock:
            if links is not None:
                self.links = tuple(sorted(links))
            self._write(limits_part.held(limits_part.view(self.plans), self.written))

    def _write(self, limits):
        """The whole table with `limits` (a View; each quota keeps what the kernel counted in it), its
        isolation rules when the node can forward; or no table when it needs none."""
        needed, routed = self._plan()
        if not needed and limits.empty:
            self._delete_table()
            self.written = limits_part.view({})
            return
        if limits.quotas:
            limits = limits_part.carried(limits, self._counted_quotas())
        self.cmd.apply_nft(script(self.s, self.links, connected(self.cmd.addresses()), routed, limits, needed))
        self.written = limits
        if needed:
            log.info("nat: table inet %s applied: clients out of %s only", self.s.nat_table,
                     ", ".join(([self.s.nat_uplink] if self.s.nat_uplink else []) + list(self.links) +
                               ["any interface (IPv%d)" % v for v in routed]) or "no interface")

    def _counted_quotas(self):
        try:
            listing = json.loads(self.cmd.list_quotas(self.s.nat_table))
        except CommandFailed as exc:
            if _NO_TABLE in exc.stderr:
                return {}  # no table yet: nothing was counted
            raise
        except ValueError:
            log.warning("limits: unreadable quota listing; quotas start from the app's counts")
            return {}
        return limits_part.counted_quotas(listing)

    def over_quota(self):
        """The users whose quota object the kernel has used up ([] without quotas: nothing is run)."""
        with self._lock:
            if not self.written.quotas:
                return []
            return limits_part.used_up(self.plans, self.written, self._counted_quotas())

    def set_limits(self, batch):
        """Apply `batch` (a list of (users, replace) from `limits` requests, in order) in one nft run:
        element changes while the limits part stays and its tiers stay the same, else the table whole.
        On a failure nothing changes, here or in the kernel."""
        with self._lock:
            plans, owners, changed = self.plans, _Owners(self.owners), set()
            for users, replace in batch:
                before = plans
                plans, touched = limits_part.merge(plans, users, replace, None if replace else owners)
                if replace:
                    owners = _Owners(limits_part.owners_of(plans))
                else:
                    owners.moved(before, plans, touched)
                changed |= touched
            # Only the users that changed are looked at: a connect costs the same at 10 or 10,000 users
            # (and holds the helper's interpreter no longer: its peer changes wait for it).
            old_part = limits_part.view({u: self.plans[u] for u in changed if u in self.plans})
            new_part = limits_part.view({u: plans[u] for u in changed if u in plans})
            aims = self._aims(limits_part.stepped(self.plans, plans, changed, self.written))
            rates = self._rates_after(old_part, new_part)
            empty = not any(rates) and not self._quota_addresses_after(old_part, new_part)
            if self.written.empty or empty or set(rates) != set(self.rates):
                wanted = limits_part.patch(self.written, old_part, new_part, aims)
                if not (self.written.empty and wanted.empty):
                    self._write(wanted)  # on a failure nothing below runs: plans and owners stay
            else:
                self._update(old_part, new_part, aims)
            self.plans, self.owners = plans, owners.commit()
            return {"users": len(plans), "addresses": len(self.owners), "tiers": sorted(self.rates),
                    "quotas": len(self.written.quotas)}

    @property
    def rates(self):
        return self._rates

    @property
    def written(self):
        return self._written

    @written.setter
    def written(self, view):
        self._written = view
        self._rates = collections.Counter(view.tiers.values())

    def _rates_after(self, old_part, new_part):
        """{rate: addresses} once `old_part` is replaced by `new_part`, without the rates that none hold."""
        after = collections.Counter(self.rates)
        after.subtract(rate for address, rate in old_part.tiers.items() if address in self.written.tiers)
        after.update(new_part.tiers.values())
        return {rate: n for rate, n in after.items() if n > 0}

    def _quota_addresses_after(self, old_part, new_part):
        return len(self.written.quota_of) - sum(a in self.written.quota_of for a in old_part.quota_of) + \
            len(new_part.quota_of)

    def _aims(self, stepped):
        """{name: (over, used)} for the kept quota objects of `stepped` (limits.stepped): each aimed at
        the app's new count from what the kernel has counted in it, so the object cuts where the app's
        count would (within the share's error on the bytes since), not up to 1.7% of the quota early."""
        if not stepped:
            return {}
        try:
            counted = self._counted_quotas()
        except CommandFailed as exc:  # the objects keep their limits; the request's own changes go on
            log.warning("limits: quota objects not aimed: %s", exc.stderr)
            return {}
        return {name: limits_part.aim(plan, counted[name]) for name, plan in stepped.items() if name in counted}

    def _update(self, old_part, new_part, aims):
        """Element and quota changes; the written view is changed in place once the kernel took them."""
        change = limits_part.delta(self.s.nat_table, old_part, new_part, aims)
        if change is not None:
            try:
                self.cmd.apply_nft(change)
            except CommandFailed as exc:  # the kernel's table is not what we wrote (say, flushed by hand)
                log.warning("limits: element update failed (%s); writing the table whole", exc.stderr)
                self._write(limits_part.patch(self.written, old_part, new_part, aims))
                return
        rates = collections.Counter(self._rates_after(old_part, new_part))  # before the view changes
        limits_part.patch_in_place(self.written, old_part, new_part, aims)
        self._rates = rates

    def _plan(self):
        """(whether the node can forward a client's packet, the IP versions the host routes on its own).

        Without an uplink the host's own switches decide: the global ones (the helper never writes them)
        for where clients may leave, and the WireGuard interface's IPv4 one (before the link exists: the
        default it will get) for whether anything is forwarded at all.
        """
        if self.s.nat_uplink:
            return True, ()
        routed = [4] if self._on("net/ipv4/conf/all/forwarding") else []
        if self.s.pool6 is not None and self._on("net/ipv6/conf/all/forwarding"):
            routed.append(6)
        if self.links or routed:
            return True, tuple(routed)
        own = "net/ipv4/conf/%s/forwarding" % self.s.interface
        return self._on(own if self.cmd.link_index(self.s.interface) is not None
                        else "net/ipv4/conf/default/forwarding"), ()

    def _on(self, key):
        try:
            return self._read(key) != "0"
        except CommandFailed as exc:
            if _NO_KEY in exc.stderr:  # no such link, or a kernel without IPv6
                return False
            raise

    def start(self, links=None):
        """The table (with the bridge `links` that are up; None: as before), before the interface is
        adopted or created.  Fails closed: nothing is deleted (an earlier table stays as it was), and an
        existing WireGuard link is taken down, so its clients have no path until a start succeeds."""
        try:
            self.apply(links)
        except CommandFailed as exc:
            log.error("nat: cannot write table inet %s: %s", self.s.nat_table, exc)
            self._no_path()
            raise

    def _no_path(self):
        try:
            if self.cmd.link_index(self.s.interface) is not None:
                self.cmd.link_down(self.s.interface)
                log.error("nat: interface %s set down: no filter, so no path for its clients", self.s.interface)
        except CommandFailed as exc:
            log.error("nat: cannot set %s down: %s", self.s.interface, exc.stderr)

    def forward(self):
        """With an uplink, once the interface exists: per-interface forwarding on.  Fails closed: a
        failure puts back every value the helper changed (clients get no forwarding; the table stays).
        Run again after each re-creation of the interface: a new link starts with the default value."""
        if not self.s.nat_uplink:
            return
        try:
            self._forward()
        except CommandFailed:
            self._restore()
            raise

    def reapply(self):
        """After the watcher re-created the interface: the table again (the host's networks read anew),
        then forwarding."""
        self.apply()
        self.forward()

    def _forward(self):
        self.saved = dict(self._load_state(), **self.saved)
        for key in self.keys:
            current = self._read(key)
            self.saved.setdefault(key, current)
            self._save_state()  # before the change, so a crash still knows the old value
            if current != "1":
                self.cmd.write_sysctl(key, "1")
            log.info("nat: %s = 1 (was %s)", key, self.saved[key])

    def stop(self):
        """`orbmesh-wghelper down`, once the link is gone: the table, then forwarding back to the saved
        values.  Returns False if a step failed (logged; the other steps still run)."""
        ok = True
        try:
            self._delete_table()
        except CommandFailed as exc:
            log.error("nat: cannot delete table inet %s: %s", self.s.nat_table, exc.stderr)
            ok = False
        return self._restore() and ok

    def _restore(self):
        """Every forwarding value the helper changed back as it was; the state file goes once all are."""
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
            # No table to delete; or no nft at all, on a host that never needed one.
            if _NO_TABLE not in exc.stderr and exc.stderr != "not found in PATH":
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
