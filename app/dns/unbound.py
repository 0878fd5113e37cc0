"""The Unbound config of the node's resolver: the one renderer (orbmesh-wg dns-config runs it).

Unbound listens on the gateway address(es) only and answers the client
pool(s) only; every other source is refused, so the node is never an open
resolver.  ip-freebind lets it bind before the WireGuard interface (and its
addresses) exists, so it starts in any order with the helper and outlives
the helper's restarts untouched.

It keeps to the firewall's rules (wghelper/validate.py: NOT_INTERNET, the
one list of what is not the internet): it never sends a query to an address
in those ranges or the client pools, so a delegation naming 10.x or
169.254.169.254 cannot make the node query a LAN resolver or the metadata
service for a client, and it removes answers carrying them, so a public
name cannot rebind a client's browser to the node's networks or another
client.  The upstreams the operator names are the one exemption: they are
queried wherever they are (docs/security.md says what that exposes).
"""
import ipaddress
import re

from wghelper.validate import NOT_INTERNET

from .resolver import PORT

# Debian's dns-root-data, kept current by Debian's updates.
TRUST_ANCHOR = "/usr/share/dns/root.key"
USERNAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def render(pool, gateway, upstreams=(), dnssec=True, pool6=None, gateway6=None, username="unbound"):
    """unbound.conf text.  Every value is parsed as an address or network first, so none can inject syntax.

    username: the user Unbound drops to after binding when started as root;
    "" when it is started as that user already (the systemd unit).
    """
    gateways = [ipaddress.ip_address(str(gateway))]
    pools = [ipaddress.ip_network(str(pool))]
    if gateway6 and pool6:
        gateways.append(ipaddress.IPv6Address(str(gateway6)))
        pools.append(ipaddress.IPv6Network(str(pool6)))
    upstreams = [ipaddress.ip_address(str(address)) for address in upstreams]
    if username and not USERNAME_RE.fullmatch(username):
        raise ValueError("not a user name: %r" % username)
    lines = ["# Rendered by orbmesh-wg dns-config (app/dns/unbound.py); rendered again at every start.",
             "server:"]
    lines += ["    interface: %s" % address for address in gateways]
    lines += ["    port: %d" % PORT,
              "    interface-automatic: no",
              "    ip-freebind: yes",
              '    username: "%s"' % username,
              '    chroot: ""',
              '    pidfile: ""',
              "    do-daemonize: no",
              "    use-syslog: no",
              '    logfile: ""',
              "    verbosity: 1",
              "    hide-identity: yes",
              "    hide-version: yes",
              # Refuse (an answer, not silence, so a misrouted client fails fast) all
              # but the pools, localhost included: Unbound allows it by default.
              "    access-control: 0.0.0.0/0 refuse",
              "    access-control: ::/0 refuse",
              "    access-control: 127.0.0.0/8 refuse",
              "    access-control: ::1/128 refuse",
              "    access-control: ::ffff:127.0.0.1/128 refuse"]
    lines += ["    access-control: %s allow" % network for network in pools]
    if dnssec:
        lines += ['    module-config: "validator iterator"', '    trust-anchor-file: "%s"' % TRUST_ANCHOR]
    else:
        lines += ['    module-config: "iterator"']
    # Localhost is in NOT_INTERNET: Unbound's own rule for it is off so that the list below,
    # less the upstreams, is the one rule (an upstream may be a local forwarder on 127.0.0.1).
    lines.append("    do-not-query-localhost: no")
    lines += ["    do-not-query-address: %s" % network for network in without(blocked(pools), upstreams)]
    # Local data (the localhost zone's 127.0.0.1 and ::1) is exempt: Unbound allows it by default.
    lines += ["    private-address: %s" % network for network in blocked(pools)]
    lines += ["remote-control:", "    control-enable: no"]
    if upstreams:
        lines += ["forward-zone:", '    name: "."']
        lines += ["    forward-addr: %s" % address for address in upstreams]
    return "\n".join(lines) + "\n"


def blocked(pools):
    """NOT_INTERNET, then each pool it does not already hold (a public pool, a routed IPv6 prefix)."""
    return list(NOT_INTERNET) + [pool for pool in pools
                                 if not any(pool.version == n.version and pool.subnet_of(n) for n in NOT_INTERNET)]


def without(networks, upstreams):
    """networks less a hole for each upstream (its /32 or /128, nothing around it)."""
    for upstream in upstreams:
        hole = ipaddress.ip_network(upstream)
        networks = [part for network in networks
                    for part in (sorted(network.address_exclude(hole))
                                 if network.version == hole.version and hole.subnet_of(network) else [network])]
    return networks


def from_settings(values, hello=None, username="unbound"):
    """render() from the settings (app/config.py) and the helper's hello (its IPv6 gateway and pool, if any)."""
    hello = hello or {}
    return render(values["POOL"], values["GATEWAY"], values["DNS_UPSTREAM"], values["DNS_DNSSEC"] == "on",
                  pool6=hello.get("pool6"), gateway6=hello.get("gateway6"), username=username)
