"""The IPv6 mode the helper decides at start (wghelper/ipv6.py): the argv it reads, and each outcome."""
import logging

import pytest

from wghelper import ipv6
from wghelper.argv import Commands

from .fakes import FakeRunner, settings

FORWARDING = ["sysctl", "-n", "net/ipv6/conf/all/forwarding"]
ROUTES = ["ip", "-6", "route", "show", "default"]
DEFAULT = "default via fe80::1 dev eth0 proto ra metric 1024 expires 1798sec pref medium\n"


def decide(runner, **overrides):
    s = settings(**dict({"pool6": "fd00:8::/64"}, **overrides))
    return ipv6.decide(s, Commands(runner))


def runner(forwarding=None, routes=""):
    r = FakeRunner()
    if forwarding is not None:
        r.sysctls["net/ipv6/conf/all/forwarding"] = forwarding
    r.routes6 = routes
    return r


def test_forwarding_on_with_a_default_route_is_forward(caplog):
    r = runner("1", DEFAULT)
    with caplog.at_level(logging.INFO, logger="wghelper.ipv6"):
        assert decide(r) == "forward"
    assert r.calls == [FORWARDING, ROUTES]  # read only: nothing is written
    assert "no IPv6 default route" not in caplog.text and "mode forward" in caplog.text


def test_forwarding_on_without_a_default_route_is_forward_and_says_so(caplog):
    """The kernel refuses such IPv6 at once (ICMPv6 no route): no black hole, so still forward."""
    with caplog.at_level(logging.WARNING, logger="wghelper.ipv6"):
        assert decide(runner("1", "")) == "forward"
    assert "no IPv6 default route" in caplog.text


@pytest.mark.parametrize("value", ["0", "2"])
def test_forwarding_not_on_is_local(caplog, value):
    r = runner(value, DEFAULT)
    with caplog.at_level(logging.WARNING, logger="wghelper.ipv6"):
        assert decide(r) == "local"
    assert r.calls == [FORWARDING]
    assert "net.ipv6.conf.all.forwarding is %s: clients get no IPv6" % value in caplog.text


def test_unreadable_forwarding_is_local(caplog):
    """A kernel without IPv6 has no such key: clients get none (the helper then fails on gateway6 anyway)."""
    r = runner(None, DEFAULT)
    with caplog.at_level(logging.WARNING, logger="wghelper.ipv6"):
        assert decide(r) == "local"
    assert "cannot read net/ipv6/conf/all/forwarding" in caplog.text


def test_unreadable_routes_still_forward(caplog):
    r = runner("1")
    r.fail = lambda argv: "RTNETLINK answers: Operation not supported" if argv == ROUTES else None
    with caplog.at_level(logging.WARNING, logger="wghelper.ipv6"):
        assert decide(r) == "forward"
    assert "cannot read the IPv6 default routes" in caplog.text


def test_pool6_off_is_off_and_reads_nothing():
    r = runner("1", DEFAULT)
    assert decide(r, pool6="off") == "off"
    assert r.calls == []


@pytest.mark.parametrize("mode, clients6", [("forward", True), ("local", False), (None, True)])
def test_settings_carry_the_mode(mode, clients6):
    """Settings.clients6: where clients' /128s may lie; nothing unless forward (no mode set: forward)."""
    s = settings(pool6="fd00:8::/64")
    if mode:
        s["IPV6_MODE"] = mode
    assert s.ipv6_mode == (mode or "forward")
    assert s.clients6 == ((s.pool6, s.gateway6) if clients6 else (None, None))
    off = settings()
    off["IPV6_MODE"] = "forward"
    assert (off.ipv6_mode, off.clients6) == ("off", (None, None))  # no pool6: off whatever was decided
