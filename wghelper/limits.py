"""Speed tiers and quota backstops: the limits part of the helper's one nftables table.

The app names users, their addresses and numbers (wghelper/requests.py
``limits``); every name in the table is derived here, and a user id never
reaches it (a quota is named by a hash).  What the part holds, for the
users with a tier or a quota:

    quota q<hash> { over Q bytes used U bytes }           one per user with a quota
    map plan4, plan6 { address : mark }                   every limited address: its tier R, and
                                                          QUOTA_BIT when it has a quota
    map quota4, quota6 { address : "q<hash>" }            a user's addresses share the quota
    set rate_<R>_up4 ... (dynamic)                        a token bucket per address: a meter
    chain tier_<R>_up4 ...                                a tier's meter, then the quota if the
                                                          mark says so, per direction and family
    chain quota_up4 ...                                   the quota alone (an address without tier)
    chain plans_in    per family one rule: the address's plan (a mark) -> goto its tier's chain
                      (or the quota's); then the mark back to 0
    chain limits_in   prerouting, from the WireGuard interface: what clients send; a packet
                      without a mark jumps to plans_in
    chain plans_out, limits_out   the same in postrouting, into the interface: what clients receive

A packet of a limited address costs two lookups whatever the number of
tiers: the address in the plan map (the plan lands in the packet's mark)
and the mark's tier in the rule's own verdict map of the tiers in use
(the quota-only chain under 0); a packet of an address without a plan
costs one (a miss).  The quota is looked up only for the addresses that
have one (the mark's QUOTA_BIT): before, every packet of the interface
paid the quota maps' lookup too, about 5% of the forwarding rate
(bench/tier_rules.py).  Earlier still, each tier in use had a set of
addresses and a rule per family, and a packet looked in every set until
its own: with six tiers a packet of the last one paid twelve rules.  Not
a verdict map from address to jump (one lookup): adding an element with a
jump makes the kernel check the whole table for loops at the commit,
every element of the map included (2.2 ms of system time per change at
40,000 addresses, against 0.09 ms for an element of the plan map).

The mark is scratch only on packets that carry none: the node marks
nothing, and a packet an operator's own rules marked keeps its mark and
is not held to a plan (docs/operations.md).  Every chain a dispatched
packet can leave puts the mark back to 0, the dispatch itself last, for
the packet whose mark found no chain: while a commit replaces the table,
the kernel's lookups see set elements of the new generation while a
packet walks the old rules, and without that last rule a packet could
leave the chains with its plan in its mark (0-3 packets in ~1,040,000 per run
under a whole rewrite every ~40 ms; none with it: docs/benchmarks.md).

Speed tier: each address of a tiered user (IPv4 and IPv6) has its own
bucket of R Mbit/s of IP packets in each direction, so every device of the
user is held to the tier and nobody else is touched; prerouting and
postrouting see what is forwarded and what the node itself sends or
receives alike.  A packet over the rate is dropped (TCP slows down to it).

Quota backstop: the app cuts a user whose counted usage reached the quota
(every peer leaves the interface).  It counts from the interface's
counters every few seconds; in between, the kernel's quota object stops
the user's packets near the quota, so a fast download cannot run past it
between two counts, and the helper tells the app which objects are used up
(over_quota; the app cuts those users too).  The kernel counts what
nftables sees (IP packets, a TCP burst as one segmentation-offload packet),
the usage counts what WireGuard counts (each packet with its 32 bytes of
header and tag): for a bulk transfer the second is 2.25% (full-size
packets one at a time: 1,420 -> 1,452 bytes, the TUN's bytes against the
usage on 2026-12-07) to 7.4% (offloaded bursts) more, so the object lets
through KERNEL_SHARE of what is left of the quota: the cut lands within
-1.7% and +3.3% of what was left when the object was last aimed (49.2 MB
of 50 once, when it was aimed only at the start).  No share keeps both
ends within 1% below and 4% above, so the app aims it again: a request
whose ``used`` grew (the app pushes one after each count once half the
quota is used: app/peers/usage.py aim) moves the object's limit to what
the kernel has counted in it plus the share of what is left (aim()), and
the early end shrinks to 1.7% of what was left at the last count.  The
object starts at the usage the app counted (``used``); its name holds the
user, the quota and the period: a new period or quota is a new object;
anything else keeps it and what it counted, also when the table is
written whole again (Firewall reads the kernel's counts first) and across
helper restarts.

Writing: the part goes into the table written whole (firewall.render) at
start, after the interface is re-created, when a bridge comes or goes and
whenever the set of tiers in use changes.  Otherwise a change of members
(a device connects, a user gets a tier that is already in use) is one
``nft -f -`` of element adds and deletes.  Either is one atomic
transaction: on an error nothing of it is applied, and what the helper
believes is written stays what it was.
"""
import hashlib
import socket
from dataclasses import dataclass

HOOKS = (("in", "prerouting", "iifname", "saddr", "up"), ("out", "postrouting", "oifname", "daddr", "down"))
METER_SIZE = 65535      # a bucket for every address of a /16 pool
METER_TIMEOUT = "1m"    # an idle address's bucket goes (it comes back full)
BURST_SECONDS = 0.2     # what a bucket holds beyond its one second of rate (nft adds that), at least MIN_BURST
MIN_BURST = 65536
QUOTA_SIZE = 24         # hex digits of the hash in a quota's name
QUOTA_BIT = 0x80000000  # in a plan's mark: the address has a quota (a tier is at most 100,000: 17 bits)
KERNEL_SHARE = (25, 26)  # the kernel's quota object holds 25/26 (1/1.04) of the usage's bytes (see above)


def kernel_bytes(usage_bytes):
    return usage_bytes * KERNEL_SHARE[0] // KERNEL_SHARE[1]


@dataclass(frozen=True)
class Plan:
    """A user's limits and addresses, as the app last sent them."""
    addresses: tuple
    rate_mbps: int | None = None
    quota: int | None = None
    used: int = 0
    period: int = 0


def quota_name(user, plan):
    """The quota object of this user, quota and period: q + 24 hex digits."""
    digest = hashlib.sha256(("%s\0%d\0%d" % (user, plan.quota, plan.period)).encode()).hexdigest()
    return "q" + digest[:QUOTA_SIZE]


@dataclass(frozen=True)
class View:
    """What the table holds for a set of plans (every field is compared to compute a delta)."""
    tiers: dict      # address -> rate (Mbit/s)
    quotas: dict     # quota name -> (over, used)
    quota_of: dict   # address -> quota name

    @property
    def rates(self):
        return frozenset(self.tiers.values())

    def marks(self):
        """{address: its plan's mark}: the tier (0: none), with QUOTA_BIT when the address has a quota."""
        marks = dict(self.tiers)
        for address in self.quota_of:
            marks[address] = marks.get(address, 0) | QUOTA_BIT
        return marks

    @property
    def empty(self):
        return not self.tiers and not self.quota_of


def view(plans):
    tiers, quotas, quota_of = {}, {}, {}
    for user, plan in plans.items():
        for address in plan.addresses:
            if plan.rate_mbps is not None:
                tiers[address] = plan.rate_mbps
            if plan.quota is not None:
                name = quota_name(user, plan)
                over = kernel_bytes(plan.quota)
                quotas[name] = (over, min(kernel_bytes(plan.used), over))
                quota_of[address] = name
    return View(tiers, quotas, quota_of)


def merge(plans, users, replace=False, owners=None):
    """(plans after a ``limits`` request, the users whose plan it changed): `users` ({user: args}) over
    `plans` (or instead, with replace).  A user without a tier and a quota, or without addresses, leaves;
    an address belongs to the user who named it last.  `owners` ({address: user} of `plans`) finds the
    users who lose an address without looking at every plan (a connect at 10,000 tiered users)."""
    new = {} if replace else dict(plans)
    changed = set(plans) if replace else set()
    claimed = {a for entry in users.values() for a in entry["addresses"]}
    losers = set(new) if owners is None else {owners[a] for a in claimed if a in owners}
    for user in losers - set(users):
        if user not in new:
            continue
        kept = tuple(a for a in new[user].addresses if a not in claimed)
        if kept != new[user].addresses:
            changed.add(user)
            new[user] = Plan(kept, new[user].rate_mbps, new[user].quota, new[user].used, new[user].period)
        if not kept:
            del new[user]
    for user, entry in users.items():
        plan = Plan(tuple(entry["addresses"]), entry["rate_mbps"], entry["quota"], entry["used"], entry["period"])
        changed.add(user)
        if plan.addresses and (plan.rate_mbps is not None or plan.quota is not None):
            new[user] = plan
        else:
            new.pop(user, None)
    return new, changed


def owners_of(plans):
    return {a: user for user, plan in plans.items() for a in plan.addresses}


def patch_in_place(full, old_part, new_part, aims=None):
    """patch(), changing `full`'s dicts themselves (the common path: no copy of 10,000 users' entries)."""
    for address in old_part.tiers:
        full.tiers.pop(address, None)
    for address in old_part.quota_of:
        full.quota_of.pop(address, None)
    kept = {name: full.quotas[name] for name in new_part.quotas if name in full.quotas and name in old_part.quotas}
    for name in old_part.quotas:
        full.quotas.pop(name, None)
    full.tiers.update(new_part.tiers)
    full.quota_of.update(new_part.quota_of)
    full.quotas.update(new_part.quotas)
    full.quotas.update(kept)
    full.quotas.update(aims or {})


def patch(full, old_part, new_part, aims=None):
    """`full` (a View) with the entries of the changed users' `old_part` replaced by their `new_part`; a
    quota object that stays keeps what `full` holds for it (what the kernel counted), aimed again if it
    is in `aims`."""
    tiers, quotas, quota_of = dict(full.tiers), dict(full.quotas), dict(full.quota_of)
    for address in old_part.tiers:
        tiers.pop(address, None)
    for address in old_part.quota_of:
        quota_of.pop(address, None)
    for name in old_part.quotas:
        quotas.pop(name, None)
    tiers.update(new_part.tiers)
    quota_of.update(new_part.quota_of)
    for name, value in new_part.quotas.items():
        quotas[name] = full.quotas[name] if name in full.quotas and name in old_part.quotas else value
    quotas.update(aims or {})
    return View(tiers, quotas, quota_of)


def _family(address):
    return 6 if ":" in address else 4


def _elements(pairs):
    return "{ %s }" % ", ".join("%s : %s" % pair for pair in pairs)


def _sorted(addresses):
    """IPv4 first, each family in address order (as nft lists elements)."""
    return sorted(addresses, key=lambda a: (_family(a), socket.inet_pton(socket.AF_INET6 if ":" in a else
                                                                          socket.AF_INET, a)))


def burst(rate_mbps):
    return max(MIN_BURST, int(rate_mbps * 125000 * BURST_SECONDS))


def objects(v):
    """The quotas, maps and meters (nft lists them before the chains)."""
    lines = []
    for name, (over, used) in sorted(v.quotas.items()):
        lines += ["\tquota %s {" % name, "\t\tover %d bytes%s" % (over, " used %d bytes" % used if used else ""),
                  "\t}", ""]
    marks = v.marks()
    maps = [("plan%d" % f, "mark", [(a, _mark(m)) for a, m in marks.items() if _family(a) == f]) for f in (4, 6)]
    maps += [("quota%d" % f, "quota", [(a, '"%s"' % n) for a, n in v.quota_of.items() if _family(a) == f])
             for f in (4, 6)]
    for name, kind, pairs in maps:
        order = {a: i for i, a in enumerate(_sorted([a for a, _ in pairs]))}
        pairs.sort(key=lambda pair: order[pair[0]])
        lines += ["\tmap %s {" % name, "\t\ttype ipv%d_addr : %s" % (int(name[-1]), kind)]
        lines += ["\t\telements = %s" % _elements(pairs)] if pairs else []
        lines += ["\t}", ""]
    for rate in sorted(v.rates):
        for d in ("up", "down"):
            for f in (4, 6):
                lines += ["\tset rate_%d_%s%d {" % (rate, d, f), "\t\ttype ipv%d_addr" % f,
                          "\t\tsize %d" % METER_SIZE, "\t\tflags dynamic,timeout", "\t\ttimeout %s" % METER_TIMEOUT,
                          "\t}", ""]
    return lines


def _mark(value):
    return "0x%08x" % value if value & QUOTA_BIT else str(value)


def chains(v, ifname):
    """Each tier's chain and the quota's, the dispatch to them, then the two hooked chains."""
    lines = []
    for _, _, _, key, d in HOOKS:
        for f, ip in ((4, "ip"), (6, "ip6")):
            quota = "quota name %s %s map @quota%d drop" % (ip, key, f)
            for rate in sorted(v.rates):
                lines += ["\tchain tier_%d_%s%d {" % (rate, d, f),
                          "\t\tupdate @rate_%d_%s%d { %s %s limit rate over %d bytes/second burst %d bytes } drop"
                          % (rate, d, f, ip, key, rate * 125000, burst(rate)),
                          "\t\tmeta mark & 0x%08x != 0 meta mark set 0 %s" % (QUOTA_BIT, quota),
                          "\t\tmeta mark set 0", "\t}", ""]
            lines += ["\tchain quota_%s%d {" % (d, f), "\t\tmeta mark set 0 %s" % quota, "\t}", ""]
    for name, _, _, key, d in HOOKS:
        lines.append("\tchain plans_%s {" % name)
        for f, ip in ((4, "ip"), (6, "ip6")):
            gotos = ", ".join(["0 : goto quota_%s%d" % (d, f)] +
                              ["%d : goto tier_%d_%s%d" % (rate, rate, d, f) for rate in sorted(v.rates)])
            lines.append("\t\tmeta mark set %s %s map @plan%d meta mark & 0x%08x vmap { %s }"
                         % (ip, key, f, QUOTA_BIT - 1, gotos))
        lines += ["\t\tmeta mark set 0", "\t}", ""]
    for name, hook, match, key, d in HOOKS:
        lines += ["\tchain limits_%s {" % name,
                  "\t\ttype filter hook %s priority filter; policy accept;" % hook,
                  '\t\t%s "%s" meta mark 0 jump plans_%s' % (match, ifname, name), "\t}", ""]
    return lines


def delta(table, old, new, aims=None):
    """`nft -f -` input turning what `old` wrote into `new` (Views, or the parts of the users that
    changed) and moving the limits of the kept quota objects in `aims` ({name: (over, used)}: aim()):
    element and quota changes in one transaction; None when nothing changes.  Only where the table
    need not be written whole (Firewall.set_limits)."""
    removes, adds = [], []
    old_marks, new_marks = old.marks(), new.marks()
    for address in _sorted(set(old_marks) | set(new_marks)):
        was, now = old_marks.get(address), new_marks.get(address)
        if was != now:
            if was is not None:
                removes.append("delete element inet %s plan%d { %s }" % (table, _family(address), address))
            if now is not None:
                adds.append("add element inet %s plan%d { %s : %s }" % (table, _family(address), address,
                                                                        _mark(now)))
    for address in _sorted(set(old.quota_of) | set(new.quota_of)):
        was, now = old.quota_of.get(address), new.quota_of.get(address)
        if was != now:
            target = "quota%d" % _family(address)
            if was is not None:
                removes.append("delete element inet %s %s { %s }" % (table, target, address))
            if now is not None:
                adds.append('add element inet %s %s { %s : "%s" }' % (table, target, address, now))
    # A quota object goes after the elements that name it, and comes before them.
    gone = ["delete quota inet %s %s" % (table, n) for n in sorted(set(old.quotas) - set(new.quotas))]
    made = ["add quota inet %s %s { over %d bytes used %d bytes }" % (table, n, *new.quotas[n])
            for n in sorted(set(new.quotas) - set(old.quotas))]
    aimed = ["add quota inet %s %s { over %d bytes }" % (table, n, aims[n][0]) for n in sorted(aims or ())]
    lines = removes + gone + made + aimed + adds
    return "\n".join(lines) + "\n" if lines else None


def stepped(before, after, users, written):
    """{quota name: plan} of the `users` whose quota object stays (same quota and period, in `written`)
    while the app counted more since it last said (plan.used grew): the objects to aim again."""
    found = {}
    for user in users:
        old, new = before.get(user), after.get(user)
        if old is None or new is None or old.quota is None or new.quota is None or new.used <= old.used:
            continue
        name = quota_name(user, new)
        if name == quota_name(user, old) and name in written.quotas:
            found[name] = new
    return found


def aim(plan, counted):
    """(over, used) of a kept quota object aimed at the app's count: from what the kernel has counted in it
    (`counted`), it lets through the kernel's share of what is left of the quota (plan.used, the app's
    count now).  Only the limit moves (``add quota`` on an existing object keeps its count)."""
    return counted + kernel_bytes(max(0, plan.quota - plan.used)), counted


def held(v, written):
    """`v` with each quota object that `written` holds as it holds it (its limit may have been aimed)."""
    return View(v.tiers, {n: written.quotas.get(n, value) for n, value in v.quotas.items()}, v.quota_of)


def carried(v, counted):
    """`v` with each quota's used bytes at least what the kernel counted (`counted`: name -> used)."""
    quotas = {n: (over, min(over, max(used, counted.get(n, 0)))) for n, (over, used) in v.quotas.items()}
    return View(v.tiers, quotas, v.quota_of)


def counted_quotas(listing):
    """{name: used} from `nft -j list quotas table inet T`'s JSON (only well-formed objects of ours)."""
    found = {}
    for item in listing.get("nftables", []) if isinstance(listing, dict) else []:
        quota = item.get("quota") if isinstance(item, dict) else None
        if isinstance(quota, dict) and isinstance(quota.get("name"), str) and isinstance(quota.get("used"), int):
            if len(quota["name"]) == QUOTA_SIZE + 1 and quota["name"].startswith("q"):
                found[quota["name"]] = quota["used"]
    return found


def used_up(plans, written, counted):
    """The users whose quota object in the kernel has counted all it holds."""
    return sorted(user for user, plan in plans.items() if plan.quota is not None
                  and (name := quota_name(user, plan)) in written.quotas and name in counted
                  and counted[name] >= written.quotas[name][0])

