"""A fake Runner for the helper's unit tests: records every argv exactly and
keeps a tiny model of links and peers so dump/sync see their own writes."""
import base64
import ipaddress
import json
import os
import threading

from wghelper.argv import Commands
from wghelper.errors import CommandFailed
from wghelper.handlers import Context, dispatch
from wghelper.interface import Interface
from wghelper.settings import load
from wghelper.writer import Writer

FAKE_IF = "wgt0"
FAKE_KEYFILE = "/state/server.key"
SERVER_PUBLIC = base64.b64encode(b"P" * 32).decode()
BRIDGE_KEYFILE = "/state/bridge.key"
BRIDGE_PUBLIC = base64.b64encode(b"Q" * 32).decode()
KEYFILES = {FAKE_KEYFILE: SERVER_PUBLIC, BRIDGE_KEYFILE: BRIDGE_PUBLIC}  # what `wg set IF private-key F` makes it
# What the fake `wg show IF dump` prints as the private key: it must never
# come back out of the helper.
DUMP_PRIVATE = base64.b64encode(b"\x11" * 32).decode()


def key(n):
    """A distinct valid public key for each small integer."""
    return base64.b64encode(n.to_bytes(4, "big") * 8).decode()


def peer(k, *ips, **extra):
    return dict({"public_key": k, "allowed_ips": list(ips) or ["10.8.0.2/32"]}, **extra)


def settings(**overrides):
    """The helper's settings as __main__ has them; IPv6 only when a test passes pool6 (the default
    "auto" pool is made from the state directory, which unit tests do not have)."""
    env = {"ORBMESH_INTERFACE": FAKE_IF, "ORBMESH_HELPER_STATE_DIR": "/nonexistent",
           "ORBMESH_HELPER_SOCKET": "/nonexistent/s.sock", "ORBMESH_POOL6": "off"}
    env.update({"ORBMESH_" + k.upper(): str(v) for k, v in overrides.items()})
    return load(env)


class FakeRunner:
    def __init__(self, kernel=True, socket_dir=None):
        self.calls = []        # every argv, e.g. ["wg", "set", "wgt0", ...]
        self.stdins = []       # (argv, stdin) for commands fed on stdin
        self.kernel = kernel
        self.socket_dir = socket_dir
        self.links = set()
        self.ifindex = {}      # link -> its ifindex; a link made again gets a new one
        self._next_index = 2   # 1 is lo
        self.link_keys = {}    # link -> the public key its dump shows, once `wg set IF private-key F` ran
        self.addresses = {}    # link -> ["10.8.0.1/16", ...], as `ip address` keeps them
        self.keyed = {}        # link -> listen port, once `wg set IF listen-port P private-key F` ran
        self.peers = {}        # key -> {"allowed_ips", "endpoint", "keepalive"}
        self.fail = None       # callable(argv) -> stderr string to fail with, or None
        self.gate = None       # threading.Event wg set waits on, when set
        self.entered = threading.Event()
        self.daemons = set()   # links a (fake) wireguard-go daemon serves; it exits when its link goes
        self.sysctls = {}      # "net/ipv4/conf/IF/forwarding" -> "0"; absent: no such key
        self.nft_tables = {}   # "inet NAME" -> the stdin that defined it
        self.nft_updates = []  # stdins of element and quota changes since
        self.quota_used = {}   # quota name -> bytes the kernel counted, for `nft -j list quotas`
        self.rules = {}        # bridge rules: "10.8.0.2" -> (pref, table), as `ip -4 rule` keeps them
        self.address_text = ""  # more lines of `ip -o address show`, as a test writes them
        self.routes6 = ""      # what `ip -6 route show default` prints
        self._lock = threading.Lock()

    def clear(self):
        with self._lock:
            self.calls.clear()

    def wg_sets(self):
        return [c for c in self.calls if c[:2] == ["wg", "set"]]

    def _record(self, argv, stdin):
        with self._lock:
            self.calls.append(argv)
            if stdin is not None:
                self.stdins.append((argv, stdin))
        if self.fail is not None:
            stderr = self.fail(argv)
            if stderr:
                raise CommandFailed(argv[0], 1, stderr)

    # --- the Runner interface -------------------------------------------

    def run(self, tool, args, stdin=None):
        if tool == "wireguard-go":
            return self.wireguard_go(*args)
        if tool in ("wg", "nft"):
            return getattr(self, tool)(*args, stdin=stdin)
        assert stdin is None
        return getattr(self, tool)(*args)

    def nft_text(self, text):
        """libnftables in the helper's process: the fake models it as the `nft -f -` it replaced."""
        return self.nft("-f", "-", stdin=text)

    def nft_json(self, words):
        """A libnftables listing: modelled as the `nft -j` it replaced."""
        return self.nft("-j", *words)

    def wg(self, *args, stdin=None):
        argv = ["wg", *args]
        if args[:1] == ("set",) and self.gate is not None:
            self.entered.set()
            assert self.gate.wait(10), "test never opened the gate"
        self._record(argv, stdin)
        if args == ("pubkey",):
            return SERVER_PUBLIC + "\n"
        name = args[1] if len(args) > 1 else None
        if name not in self.links:
            raise CommandFailed("wg", 1, "Unable to access interface: No such device")
        if args[0] == "show" and args[2:] == ("dump",):
            return self._dump(name)
        if args[0] == "set":
            self._set(name, list(args[2:]))
        return ""

    def ip(self, *args):
        argv = ["ip", *args]
        self._record(argv, None)
        if args[:4] == ("-o", "link", "show", "dev"):
            if args[4] not in self.links:
                raise CommandFailed("ip", 1, 'Device "%s" does not exist.' % args[4])
            return "%d: %s: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 qdisc noqueue\\    link/none \n" % (
                self._index(args[4]), args[4])
        elif args == ("-o", "link", "show"):
            return "".join("%d: %s: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 qdisc noqueue\\    link/none \n"
                           % (n, name) for n, name in enumerate(["lo"] + sorted(self.links), 1))
        elif args[:4] == ("-o", "address", "show", "dev"):
            if args[4] not in self.links:
                raise CommandFailed("ip", 1, 'Device "%s" does not exist.' % args[4])
            return self._address_lines([args[4]])
        elif args[1:3] == ("address", "replace"):
            held = self.addresses.setdefault(args[5], [])
            if args[3] not in held:
                held.append(args[3])
        elif args[1:3] == ("address", "flush"):
            self.addresses.pop(args[4], None)
        elif args[:3] == ("link", "add", "dev"):
            if not self.kernel:
                raise CommandFailed("ip", 2, "Error: Unknown device type.")
            self.links.add(args[3])
            self.ifindex.pop(args[3], None)
            self.keyed.pop(args[3], None)
            self.link_keys.pop(args[3], None)
        elif args[:3] == ("link", "del", "dev"):
            if args[3] not in self.links:
                raise CommandFailed("ip", 1, "Cannot find device")
            self.links.discard(args[3])
            self.ifindex.pop(args[3], None)
            self.addresses.pop(args[3], None)
            self.keyed.pop(args[3], None)
            self.link_keys.pop(args[3], None)
            self.daemons.discard(args[3])  # wireguard-go exits with its link
        elif args == ("-o", "address", "show"):
            return self._address_lines(sorted(self.addresses)) + self.address_text
        elif args == ("-6", "route", "show", "default"):
            return self.routes6
        elif args[:3] == ("-4", "rule", "show"):
            return "".join("%s:\tfrom %s lookup %s\n" % (pref, a, table)
                           for a, (pref, table) in sorted(self.rules.items()) if pref == args[4])
        elif args[:3] == ("-4", "rule", "add"):
            self.rules[args[6].split("/")[0]] = (args[4], args[8])
        elif args[:3] == ("-4", "rule", "del"):
            if self.rules.pop(args[6].split("/")[0], None) is None:
                raise CommandFailed("ip", 2, "RTNETLINK answers: No such file or directory")
        return ""

    def nft(self, *args, stdin=None):
        argv = ["nft", *args]
        self._record(argv, stdin)
        if args == ("-f", "-"):
            first = stdin.splitlines()[0]
            if first.startswith("table "):         # "table inet NAME {}": the table whole
                self.nft_tables[" ".join(first.split()[1:3])] = stdin
            else:                                  # "add element inet NAME ...": changes to a table that is there
                if "inet " + first.split()[3] not in self.nft_tables:
                    raise CommandFailed("nft", 1, "Error: Could not process rule: No such file or directory")
                self.nft_updates.append(stdin)
        elif args[:2] == ("delete", "table"):
            if self.nft_tables.pop(" ".join(args[2:4]), None) is None:
                raise CommandFailed("nft", 1, "Error: Could not process rule: No such file or directory")
        elif args[:3] == ("-j", "list", "quotas"):
            if " ".join(args[-2:]) not in self.nft_tables:
                raise CommandFailed("nft", 1, "Error: No such file or directory; did you mean table 'x' in family "
                                    "inet?")
            return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}] + [
                {"quota": {"family": "inet", "name": name, "table": args[-1], "bytes": 1, "used": used, "inv": True}}
                for name, used in self.quota_used.items()]})
        return ""

    def sysctl(self, *args):
        argv = ["sysctl", *args]
        self._record(argv, None)
        key, _, value = args[1].partition("=")
        if key not in self.sysctls:
            raise CommandFailed("sysctl", 255, "sysctl: cannot stat /proc/sys/%s: No such file or directory"
                                % key)
        if args[0] == "-w":
            self.sysctls[key] = value
            return "%s = %s\n" % (key.replace("/", "."), value)
        return self.sysctls[key] + "\n"

    def wireguard_go(self, ifname):
        self._record(["wireguard-go", ifname], None)
        self.links.add(ifname)
        self.ifindex.pop(ifname, None)
        self.daemons.add(ifname)
        if self.socket_dir:
            open(os.path.join(self.socket_dir, ifname + ".sock"), "w").close()
        return ""

    # --- the model ------------------------------------------------------

    def _index(self, ifname):
        if ifname not in self.ifindex:
            self.ifindex[ifname] = self._next_index
            self._next_index += 1
        return self.ifindex[ifname]

    def remade(self, ifname):
        """The link was deleted and made again by someone else (a fresh wireguard-go): new index, no key."""
        self.links.add(ifname)
        self.ifindex.pop(ifname, None)
        self.keyed.pop(ifname, None)
        self.link_keys.pop(ifname, None)
        self.addresses.pop(ifname, None)

    def adopted(self, ifname, address="10.8.0.1/16", port=51820):
        """A link as a helper before this one left it: keyed, addressed, up."""
        self.links.add(ifname)
        self.keyed[ifname] = port
        self.link_keys[ifname] = SERVER_PUBLIC
        self.addresses[ifname] = [address]

    def _dump(self, ifname):
        if ifname in self.link_keys:
            lines = ["%s\t%s\t%d\toff" % (DUMP_PRIVATE, self.link_keys[ifname], self.keyed.get(ifname, 51820))]
        else:  # a fresh link: no key yet, a port of its own
            lines = ["(none)\t(none)\t43117\toff"]
        for k, p in self.peers.items():
            lines.append("\t".join([
                k, "(none)", p["endpoint"] or "(none)", ",".join(p["allowed_ips"]) or "(none)",
                "0", "100", "200", str(p["keepalive"]) if p["keepalive"] else "off"]))
        return "\n".join(lines) + "\n"

    def _address_lines(self, links):
        """`ip -o address show` lines of `links`."""
        return "".join("%d: %s    %s %s scope global %s\\       valid_lft forever\n"
                       % (n, dev, "inet6" if ":" in cidr.split(" ")[0] else "inet", cidr, dev)
                       for n, dev in enumerate(links, 1) for cidr in self.addresses.get(dev, []))

    def _set(self, ifname, args):
        if "private-key" in args:
            self.link_keys[ifname] = KEYFILES.get(args[args.index("private-key") + 1], SERVER_PUBLIC)
            if "listen-port" in args:
                self.keyed[ifname] = int(args[args.index("listen-port") + 1])
        i = 0
        current = None
        while i < len(args):
            word = args[i]
            if word == "peer":
                current = args[i + 1]
                self.peers.setdefault(current, {"allowed_ips": [], "endpoint": None, "keepalive": 0})
                i += 2
            elif word == "remove":
                self.peers.pop(current, None)
                i += 1
            elif word == "allowed-ips":
                nets = args[i + 1].split(",")
                for other in self.peers.values():  # an address has one owner
                    other["allowed_ips"] = [a for a in other["allowed_ips"] if a not in nets]
                self.peers[current]["allowed_ips"] = [str(ipaddress.ip_network(n)) for n in nets]
                i += 2
            elif word == "endpoint":
                self.peers[current]["endpoint"] = args[i + 1]
                i += 2
            elif word == "persistent-keepalive":
                self.peers[current]["keepalive"] = int(args[i + 1])
                i += 2
            elif word in ("listen-port", "private-key"):
                i += 2
            else:
                raise AssertionError("fake wg set cannot parse %r" % word)


class Helper:
    """The helper's parts wired together around a FakeRunner."""

    def __init__(self, tmp_path, kernel=True, **overrides):
        self.runner = FakeRunner(kernel=kernel, socket_dir=str(tmp_path))
        self.settings = settings(**overrides)
        self.cmd = Commands(self.runner)
        self.iface = Interface(self.settings, self.cmd, FAKE_KEYFILE, socket_dir=str(tmp_path))
        self.writer = Writer(self.cmd, FAKE_IF)
        self.ctx = Context(self.settings, self.cmd, self.iface, self.writer, SERVER_PUBLIC)

    def start(self):
        self.iface.up()
        self.writer.start()
        self.runner.clear()
        return self

    def call(self, cmd, args=None):
        return dispatch(self.ctx, 1, cmd, args or {})

    def result(self, cmd, args=None):
        reply = self.call(cmd, args)
        assert reply["ok"], reply
        return reply["result"]
