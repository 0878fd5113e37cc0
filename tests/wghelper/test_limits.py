"""Speed tiers and quota backstops (wghelper/limits.py): plans, the exact rules, deltas, the merging writer."""
import json
import os
import subprocess

import pytest

from tests.need import missing, need
from wghelper import firewall, limits
from wghelper.limits import Plan

from .fakes import settings


def entry(*addresses, rate=None, quota=None, used=0, period=0):
    return {"addresses": list(addresses), "rate_mbps": rate, "quota": quota, "used": used, "period": period}


QA = limits.quota_name("alice", Plan((), quota=50_000_000))

OBJECTS_AND_CHAINS = """\
table inet orbmesh {
\tquota %(qa)s {
\t\tover 48076923 bytes used 961 bytes
\t}

\tmap plan4 {
\t\ttype ipv4_addr : mark
\t\telements = { 10.8.0.2 : 20, 10.8.0.3 : 0x80000000, 10.8.0.10 : 20 }
\t}

\tmap plan6 {
\t\ttype ipv6_addr : mark
\t\telements = { fd00:8::2 : 20 }
\t}

\tmap quota4 {
\t\ttype ipv4_addr : quota
\t\telements = { 10.8.0.3 : "%(qa)s" }
\t}

\tmap quota6 {
\t\ttype ipv6_addr : quota
\t}

\tset rate_20_up4 {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 1m
\t}

\tset rate_20_up6 {
\t\ttype ipv6_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 1m
\t}

\tset rate_20_down4 {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 1m
\t}

\tset rate_20_down6 {
\t\ttype ipv6_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 1m
\t}

\tchain tier_20_up4 {
\t\tupdate @rate_20_up4 { ip saddr limit rate over 2500000 bytes/second burst 500000 bytes } drop
\t\tmeta mark & 0x80000000 != 0 meta mark set 0 quota name ip saddr map @quota4 drop
\t\tmeta mark set 0
\t}

\tchain quota_up4 {
\t\tmeta mark set 0 quota name ip saddr map @quota4 drop
\t}

\tchain tier_20_up6 {
\t\tupdate @rate_20_up6 { ip6 saddr limit rate over 2500000 bytes/second burst 500000 bytes } drop
\t\tmeta mark & 0x80000000 != 0 meta mark set 0 quota name ip6 saddr map @quota6 drop
\t\tmeta mark set 0
\t}

\tchain quota_up6 {
\t\tmeta mark set 0 quota name ip6 saddr map @quota6 drop
\t}

\tchain tier_20_down4 {
\t\tupdate @rate_20_down4 { ip daddr limit rate over 2500000 bytes/second burst 500000 bytes } drop
\t\tmeta mark & 0x80000000 != 0 meta mark set 0 quota name ip daddr map @quota4 drop
\t\tmeta mark set 0
\t}

\tchain quota_down4 {
\t\tmeta mark set 0 quota name ip daddr map @quota4 drop
\t}

\tchain tier_20_down6 {
\t\tupdate @rate_20_down6 { ip6 daddr limit rate over 2500000 bytes/second burst 500000 bytes } drop
\t\tmeta mark & 0x80000000 != 0 meta mark set 0 quota name ip6 daddr map @quota6 drop
\t\tmeta mark set 0
\t}

\tchain quota_down6 {
\t\tmeta mark set 0 quota name ip6 daddr map @quota6 drop
\t}

\tchain plans_in {
\t\tmeta mark set ip saddr map @plan4 meta mark & 0x7fffffff vmap { 0 : goto quota_up4, 20 : goto tier_20_up4 }
\t\tmeta mark set ip6 saddr map @plan6 meta mark & 0x7fffffff vmap { 0 : goto quota_up6, 20 : goto tier_20_up6 }
\t\tmeta mark set 0
\t}

\tchain plans_out {
\t\tmeta mark set ip daddr map @plan4 meta mark & 0x7fffffff vmap { 0 : goto quota_down4, 20 : goto tier_20_down4 }
\t\tmeta mark set ip6 daddr map @plan6 meta mark & 0x7fffffff vmap { 0 : goto quota_down6, 20 : goto tier_20_down6 }
\t\tmeta mark set 0
\t}

\tchain limits_in {
\t\ttype filter hook prerouting priority filter; policy accept;
\t\tiifname "wgt0" meta mark 0 jump plans_in
\t}

\tchain limits_out {
\t\ttype filter hook postrouting priority filter; policy accept;
\t\toifname "wgt0" meta mark 0 jump plans_out
\t}
}
""" % {"qa": QA}

PLANS = {"bob": Plan(("10.8.0.10", "10.8.0.2", "fd00:8::2"), rate_mbps=20),
         "alice": Plan(("10.8.0.3",), quota=50_000_000, used=1000)}


# --- plans --------------------------------------------------------------------------

def test_merge_upserts_clears_and_moves_addresses():
    plans, changed = limits.merge({}, {"u1": entry("10.8.0.2", rate=20), "u2": entry("10.8.0.3")})
    assert plans == {"u1": Plan(("10.8.0.2",), 20)} and changed == {"u1", "u2"}  # u2 has no limit: not in it
    plans, changed = limits.merge(plans, {"u3": entry("10.8.0.2", "10.8.0.4", quota=5)})
    assert plans == {"u3": Plan(("10.8.0.2", "10.8.0.4"), None, 5)}  # the address is u3's now; u1 has none left
    assert changed == {"u1", "u3"}
    plans, _ = limits.merge(plans, {"u1": entry("10.8.0.5", rate=7)})
    assert set(plans) == {"u1", "u3"}
    assert limits.merge(plans, {"u3": entry()})[0] == {"u1": Plan(("10.8.0.5",), 7)}   # no addresses: out
    assert limits.merge(plans, {"u9": entry("10.8.0.9", rate=1)}, replace=True) == (
        {"u9": Plan(("10.8.0.9",), 1)}, {"u1", "u3", "u9"})
    # With the owners of the addresses, only the users that lose one are looked at, with the same result.
    many = {"u%d" % i: Plan(("10.8.1.%d" % i,), 5) for i in range(2, 200)}
    moved = {"u1": entry("10.8.1.7", rate=9)}
    assert limits.merge(many, moved, owners=limits.owners_of(many)) == limits.merge(many, moved)
    assert limits.merge(many, moved, owners=limits.owners_of(many))[1] == {"u1", "u7"}


def test_patch_replaces_only_the_changed_users_and_keeps_what_the_kernel_counted():
    full = limits.carried(limits.view(PLANS), {QA: 5555})
    new_part = limits.view({"bob": Plan(("10.8.0.99",), 50), "alice": PLANS["alice"]})
    patched = limits.patch(full, limits.view({"bob": PLANS["bob"], "alice": PLANS["alice"]}), new_part)
    assert patched.tiers == {"10.8.0.99": 50} and patched.quotas == {QA: (48_076_923, 5555)}
    assert full.tiers == limits.view(PLANS).tiers  # a copy: what was written is not changed


def test_quota_names_follow_user_quota_and_period():
    base = limits.quota_name("u1", Plan((), quota=100))
    assert base.startswith("q") and len(base) == 25 and base.isalnum()
    assert limits.quota_name("u1", Plan(("10.8.0.2",), quota=100, used=99)) == base  # usage and addresses: same
    assert len({base, limits.quota_name("u2", Plan((), quota=100)), limits.quota_name("u1", Plan((), quota=101)),
                limits.quota_name("u1", Plan((), quota=100, period=1))}) == 4


def test_the_kernel_holds_its_share_of_the_quota_and_usage():
    v = limits.view({"u1": Plan(("10.8.0.2",), quota=50_000_000, used=26_000)})
    assert list(v.quotas.values()) == [(48_076_923, 25_000)]  # 25/26: WireGuard counts ~4% more than nft
    assert list(limits.view({"u1": Plan(("10.8.0.2",), quota=10, used=25)}).quotas.values()) == [(9, 9)]


# --- the rules ----------------------------------------------------------------------

def test_exact_limits_part_without_nat():
    # No uplink and no bridge (run-local): the table holds the limits and nothing else.
    assert firewall.render(settings(), limits=limits.view(PLANS), isolating=False) == OBJECTS_AND_CHAINS


def test_limits_go_around_the_isolation_chains():
    table = firewall.render(settings(nat_uplink="up0"), limits=limits.view(PLANS))
    chains = [line.split()[1] for line in table.splitlines() if line.startswith("\tchain ")]
    assert chains == ["postrouting", "input", "forward", "to_node", "from_clients", "tier_20_up4", "quota_up4",
                      "tier_20_up6", "quota_up6", "tier_20_down4", "quota_down4", "tier_20_down6", "quota_down6",
                      "plans_in", "plans_out", "limits_in", "limits_out"]
    assert table.index("\tquota ") < table.index("\tmap plan4") < table.index("\tchain postrouting")
    # Without limits, the table is the one it always was.
    assert firewall.render(settings(nat_uplink="up0"), limits=limits.view({})) == firewall.render(
        settings(nat_uplink="up0"))


def test_each_tier_has_its_meters_and_one_dispatch_rule_per_family_and_way():
    v = limits.view({"a": Plan(("10.8.0.2",), rate_mbps=5), "b": Plan(("10.8.0.3",), rate_mbps=100000)})
    table = firewall.render(settings(), limits=v)
    assert "\tmap plan4 {\n\t\ttype ipv4_addr : mark\n\t\telements = { 10.8.0.2 : 5, 10.8.0.3 : 100000 }" in table
    assert ('\tchain plans_out {\n\t\tmeta mark set ip daddr map @plan4 meta mark & 0x7fffffff vmap '
            '{ 0 : goto quota_down4, 5 : goto tier_5_down4, 100000 : goto tier_100000_down4 }') in table
    assert 'oifname "wgt0" meta mark 0 jump plans_out' in table
    assert "\tchain tier_100000_down4 {\n\t\tupdate @rate_100000_down4 { ip daddr limit rate" in table
    assert "limit rate over 625000 bytes/second burst 125000 bytes" in table
    assert "limit rate over 12500000000 bytes/second burst 2500000000 bytes" in table
    assert limits.burst(1) == 65536  # the smallest
    assert table.count("\tset rate_") == 8 and table.count("\tchain tier_") == 8
    assert table.count("vmap") == 4  # two ways, two families: not one rule per tier
    # Every chain a packet can leave with its plan in the mark ends by putting it back to 0: each tier's,
    # and the dispatch's (a mark that found no chain: a commit under way).
    assert table.count("\t\tmeta mark set 0\n\t}") == 8 + 2
    # Only quotas: no tier chains and no meters; the quota is looked up only for its addresses.
    only = firewall.render(settings(), limits=limits.view({"a": Plan(("10.8.0.2",), quota=5)}))
    assert "\tchain tier_" not in only and "\tset rate_" not in only
    assert "\tmap plan4 {\n\t\ttype ipv4_addr : mark\n\t\telements = { 10.8.0.2 : 0x80000000 }" in only
    assert "vmap { 0 : goto quota_down4 }" in only and only.count("quota name") == 4
    # A tier with a quota: the meter first, then the quota for the marks that carry its bit.
    both = firewall.render(settings(), limits=limits.view({"a": Plan(("10.8.0.2",), rate_mbps=5, quota=5)}))
    assert "elements = { 10.8.0.2 : 0x80000005 }" in both
    assert ("\tchain tier_5_down4 {\n\t\tupdate @rate_5_down4 { ip daddr limit rate over 625000 bytes/second burst "
            "125000 bytes } drop\n\t\tmeta mark & 0x80000000 != 0 meta mark set 0 quota name ip daddr map @quota4 "
            "drop\n\t\tmeta mark set 0\n\t}") in both


# --- deltas ---------------------------------------------------------------------------

def test_a_new_device_of_a_tiered_user_is_one_element_add():
    old = limits.view(PLANS)
    new = limits.view(dict(PLANS, bob=Plan(PLANS["bob"].addresses + ("10.8.0.11",), rate_mbps=20)))
    assert limits.delta("orbmesh", old, new) == (
        "add element inet orbmesh plan4 { 10.8.0.11 : 20 }\n")
    assert limits.delta("orbmesh", new, new) is None


def test_a_new_period_replaces_the_quota_object():
    old = limits.view(PLANS)
    reset = dict(PLANS, alice=Plan(("10.8.0.3", "fd00:8::3"), quota=50_000_000, used=0, period=1))
    q1 = limits.quota_name("alice", reset["alice"])
    assert limits.delta("orbmesh", old, limits.view(reset)) == (
        "delete element inet orbmesh quota4 { 10.8.0.3 }\n"
        "delete quota inet orbmesh %s\n"
        "add quota inet orbmesh %s { over 48076923 bytes used 0 bytes }\n"
        "add element inet orbmesh plan6 { fd00:8::3 : 0x80000000 }\n"
        'add element inet orbmesh quota4 { 10.8.0.3 : "%s" }\n'
        'add element inet orbmesh quota6 { fd00:8::3 : "%s" }\n' % (QA, q1, q1, q1))


def test_a_user_leaving_a_tier_that_others_keep():
    old = limits.view(dict(PLANS, carol=Plan(("10.8.0.7",), rate_mbps=20)))
    assert limits.delta("orbmesh", old, limits.view(PLANS)) == (
        "delete element inet orbmesh plan4 { 10.8.0.7 }\n")


def test_a_device_moving_to_another_tier_in_use_changes_its_element():
    old = limits.view(dict(PLANS, carol=Plan(("10.8.0.7",), rate_mbps=50)))
    new = limits.view(dict(PLANS, carol=Plan(("10.8.0.7",), rate_mbps=20), dave=Plan(("10.8.0.8",), rate_mbps=50)))
    assert limits.delta("orbmesh", old, new) == (
        "delete element inet orbmesh plan4 { 10.8.0.7 }\n"
        "add element inet orbmesh plan4 { 10.8.0.7 : 20 }\n"
        "add element inet orbmesh plan4 { 10.8.0.8 : 50 }\n")


def test_carried_keeps_what_the_kernel_counted():
    v = limits.view(PLANS)
    counted = limits.counted_quotas({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"quota": {"family": "inet", "name": QA, "table": "orbmesh", "bytes": 50000000, "used": 7777, "inv": True}},
        {"quota": {"name": "someone_elses", "used": 5}}, {"quota": {"name": QA[:-1] + "z", "used": "x"}}]})
    assert counted == {QA: 7777}
    assert limits.carried(v, counted).quotas == {QA: (48_076_923, 7777)}
    assert limits.carried(v, {QA: 10}).quotas == {QA: (48_076_923, 961)}      # the app counted more: kept
    assert limits.carried(v, {QA: 10 ** 9}).quotas == {QA: (48_076_923, 48_076_923)}
    assert limits.counted_quotas([]) == {} and limits.counted_quotas({"nftables": ["x"]}) == {}


def test_used_up_names_the_users_whose_object_the_kernel_filled():
    plans = {"alice": Plan(("10.8.0.3",), quota=1000), "bob": Plan(("10.8.0.4",), quota=1000, period=2),
             "carol": Plan(("10.8.0.5",), rate_mbps=5)}
    v = limits.view(plans)
    name = {u: limits.quota_name(u, p) for u, p in plans.items() if p.quota}
    assert limits.used_up(plans, v, {name["alice"]: 961, name["bob"]: 960}) == ["alice"]
    assert limits.used_up(plans, v, {}) == []
    assert limits.used_up(plans, limits.view({}), {name["alice"]: 5000}) == []  # not written: not ours to judge


def test_a_kept_quota_object_is_aimed_at_the_usage_the_app_counted_since():
    before = {"alice": Plan(("10.8.0.3",), quota=1000, used=100), "bob": Plan(("10.8.0.4",), quota=1000, used=100),
              "carol": Plan(("10.8.0.5",), quota=1000, used=100), "dave": Plan(("10.8.0.6",), rate_mbps=5)}
    after = dict(before, alice=Plan(("10.8.0.3",), quota=1000, used=600),           # counted more: aimed
                 bob=Plan(("10.8.0.4",), quota=1000, used=100),                     # no more: left alone
                 carol=Plan(("10.8.0.5",), quota=1000, used=600, period=1),         # a new object instead
                 dave=Plan(("10.8.0.6",), rate_mbps=5, quota=1000, used=600))       # a new object too
    written = limits.view(before)
    stepped = limits.stepped(before, after, set(after), written)
    assert stepped == {limits.quota_name("alice", after["alice"]): after["alice"]}
    assert limits.stepped(before, after, {"bob", "carol"}, written) == {}           # only the users that changed
    assert limits.stepped(before, after, {"alice"}, limits.view({})) == {}         # not written: nothing to aim
    # What the kernel counted so far (IP bytes) plus its share of what is left of the quota (400 of 1,000).
    assert limits.aim(after["alice"], 480) == (480 + 384, 480)
    assert limits.aim(Plan((), quota=1000, used=1200), 990) == (990, 990)          # over: used up at once


def test_aiming_moves_only_the_limit_in_the_same_transaction_and_in_what_was_written():
    old, new = limits.view(PLANS), limits.view(PLANS)
    aims = {QA: (30_000_000, 20_000_000)}
    assert limits.delta("orbmesh", old, new, aims) == "add quota inet orbmesh %s { over 30000000 bytes }\n" % QA
    full = limits.carried(limits.view(PLANS), {QA: 5555})
    assert limits.patch(full, old, new, aims).quotas == {QA: (30_000_000, 20_000_000)}
    assert full.quotas == {QA: (48_076_923, 5555)}                                   # patch() copies
    limits.patch_in_place(full, old, new, aims)
    assert full.quotas == {QA: (30_000_000, 20_000_000)}
    assert limits.used_up({"alice": PLANS["alice"]}, full, {QA: 29_999_999}) == []
    assert limits.used_up({"alice": PLANS["alice"]}, full, {QA: 30_000_000}) == ["alice"]


# --- with the real nft, in a network namespace of its own ---------------------------

def _in_fresh_netns(tmp_path, *scripts):
    """Run `nft -f` of each script, then list the table, in a network namespace that ends with the call."""
    need("nft")
    if os.geteuid() != 0:
        missing("needs root for a network namespace")
    paths = []
    for i, text in enumerate(scripts):
        paths.append(tmp_path / ("%d.nft" % i))
        paths[-1].write_text(text)
    program = " && ".join(["nft -f %s" % p for p in paths] + ["nft -j list table inet orbmesh"])
    done = subprocess.run([need("unshare"), "--net", "sh", "-c", program], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["nftables"]


def test_the_real_nft_takes_the_table_and_the_deltas(tmp_path):
    s = settings(nat_uplink="up0", pool6="fd00:8::/64")
    first = limits.view(PLANS)
    more = dict(PLANS, bob=Plan(PLANS["bob"].addresses + ("10.8.0.11",), rate_mbps=20),
                alice=Plan(("10.8.0.3",), quota=50_000_000, period=1))
    second = limits.view(more)
    listed = _in_fresh_netns(tmp_path, firewall.script(s, limits=first), limits.delta("orbmesh", first, second))
    members = {item["map"]["name"]: item["map"].get("elem", []) for item in listed if "map" in item}
    assert members["plan4"] == [["10.8.0.2", 20], ["10.8.0.3", 0x80000000], ["10.8.0.10", 20], ["10.8.0.11", 20]]
    quotas = {item["quota"]["name"]: item["quota"] for item in listed if "quota" in item}
    assert list(quotas) == [limits.quota_name("alice", more["alice"])]
    assert quotas[limits.quota_name("alice", more["alice"])]["bytes"] == 48_076_923



def test_the_real_kernel_moves_an_aimed_objects_limit_and_keeps_its_count(tmp_path):
    first = limits.view(PLANS)
    aimed = limits.delta("orbmesh", first, first, {QA: (30_000_000, 961)})
    listed = _in_fresh_netns(tmp_path, firewall.script(settings(), limits=first, isolating=False), aimed)
    quota = next(item["quota"] for item in listed if "quota" in item)
    assert (quota["name"], quota["bytes"], quota["used"]) == (QA, 30_000_000, 961)
