"""Which IPv6 the node can give its clients, decided once at helper start.

Every client used to get a /128 and route ``::/0`` into the tunnel, but
Linux forwards IPv6 only when ``net.ipv6.conf.all.forwarding`` is 1, and
that switch is the host's, not the helper's.  With it at 0 the kernel drops
a client's IPv6 to the internet without a word: apps that try IPv6 first
stall until their own timeouts.  So:

* FORWARD (forwarding is 1): clients get their /128.  Without an IPv6
  default route the kernel answers their IPv6 beyond the node at once with
  ICMPv6 "no route", so a connect fails in milliseconds and apps fall back
  to IPv4; that is only logged here.
* LOCAL (forwarding is 0, or unreadable): clients get no IPv6 at all (no
  /128 on the peer, ``ip6`` null), so they have only link-local IPv6 and
  connect to names over IPv4 (RFC 6724 orders an IPv6 address, which only a
  link-local source would reach, after IPv4).  Their ``::/0`` still goes
  into the tunnel and ends here: nothing leaks.  A connect to an IPv6
  *address* is dropped here too and waits for its own timeout
  (docs/operations.md, "IPv6 modes").
* OFF: ORBMESH_POOL6=off.

Read at start only: the app learns the mode with the new generation of a
start and reconcile converges every peer to it; a helper that changed it
while running would leave the app's answers behind.  After changing the
sysctl, restart the helper (clients keep their tunnels).
"""
import logging

from .errors import CommandFailed
from .settings import IPV6_FORWARD, IPV6_LOCAL, IPV6_OFF

log = logging.getLogger(__name__)

FORWARDING = "net/ipv6/conf/all/forwarding"


def decide(s, cmd):
    """The mode for settings `s` on this host (reads one sysctl and the IPv6 default routes)."""
    if s.pool6 is None:
        return IPV6_OFF
    try:
        forwarding = cmd.read_sysctl(FORWARDING)
    except CommandFailed as exc:
        log.warning("ipv6: cannot read %s (%s): clients get no IPv6", FORWARDING, exc.stderr)
        return IPV6_LOCAL
    if forwarding != "1":
        log.warning("ipv6: %s is %s: clients get no IPv6 (mode local); set it to 1 (install.sh "
                    "--ipv6-forwarding) and restart the helper to give them IPv6", FORWARDING.replace("/", "."),
                    forwarding)
        return IPV6_LOCAL
    try:  # only a log line depends on it
        if not cmd.default_routes6().strip():
            log.warning("ipv6: no IPv6 default route: clients' IPv6 beyond the node is refused (ICMPv6 no "
                        "route) until there is one")
    except CommandFailed as exc:
        log.warning("ipv6: cannot read the IPv6 default routes: %s", exc.stderr)
    log.info("ipv6: mode forward: clients get their /128")
    return IPV6_FORWARD
