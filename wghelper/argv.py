"""Everything the helper runs as root: one method per command shape.

Reading this file is reading the whole list.  Every value reaching here
has already been validated and normalised (wghelper/requests.py for what
the app sends, wghelper/settings.py for the configuration); this module
adds no shell, no string joining of untrusted text and no name lookups.
Secrets never go into an argv: private keys travel by path (``wg set ...
private-key FILE``) or on stdin (``wg pubkey``).

Commands is what the rest of the helper calls; Runner, below it, is the
only code that imports ``sh``, and the only code that reaches libnftables
(Debian's python3-nftables binding: nftables text the helper rendered itself,
applied in this process rather than by a run of ``nft -f -``).  Runner runs
each argv in its Spawner, a small process forked from the helper at its
first command.
"""
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

import sh

from .errors import CommandFailed

log = logging.getLogger(__name__)

STDERR_LIMIT = 500
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNREACHABLE_METRIC = "4294967295"  # the last resort of a bridge table
PEERS_PER_CALL = 1000  # ~120 bytes of argv each, far below ARG_MAX


def _family(cidr):
    return "-6" if ":" in cidr else "-4"


class Commands:
    def __init__(self, runner):
        self.run = runner.run
        self.nft_text = runner.nft_text
        self.nft_json = runner.nft_json

    # --- wg --------------------------------------------------------------

    def public_key(self, private_key):
        return self.run("wg", ["pubkey"], stdin=private_key + "\n").strip()

    def dump(self, ifname):
        """`wg show IF dump`: its first line holds the private key (handlers.parse_dump drops it)."""
        return self.run("wg", ["show", ifname, "dump"])

    def peer_keys(self, ifname):
        return self.run("wg", ["show", ifname, "peers"]).split()

    def set_interface(self, ifname, listen_port, key_path):
        self.run("wg", ["set", ifname, "listen-port", str(listen_port), "private-key", key_path])

    def set_peers(self, ifname, removes, adds):
        """Remove, then add or update peers ({"public_key", "allowed_ips", "endpoint", "keepalive"}).

        Removals come first so a freed address can be reused in the same call.
        """
        clauses = [["peer", key, "remove"] for key in removes]
        for peer in adds:
            clause = ["peer", peer["public_key"], "allowed-ips", ",".join(peer["allowed_ips"])]
            if peer.get("endpoint"):
                clause += ["endpoint", peer["endpoint"]]
            # Always sent, so that an update can switch keepalive off with 0.
            clauses.append(clause + ["persistent-keepalive", str(peer.get("keepalive", 0))])
        for start in range(0, len(clauses), PEERS_PER_CALL):
            self.run("wg", ["set", ifname] + [a for c in clauses[start:start + PEERS_PER_CALL] for a in c])

    def set_exit_peer(self, ifname, key_path, public_key, endpoint, keepalive):
        """A bridge link's key and its one peer, the exit, which takes everything."""
        self.run("wg", ["set", ifname, "private-key", key_path, "peer", public_key, "endpoint", endpoint,
                        "allowed-ips", "0.0.0.0/0", "persistent-keepalive", str(keepalive)])

    # --- ip link and address --------------------------------------------------

    def links(self):
        """Read only: every link, a line each (bridge links a helper before us left up)."""
        return self.run("ip", ["-o", "link", "show"])

    def link_index(self, ifname):
        """The link's ifindex, None when there is no such link: a link deleted and made again has a new one."""
        try:
            first = self.run("ip", ["-o", "link", "show", "dev", ifname]).split(":", 1)[0]
        except CommandFailed:
            return None
        return int(first) if first.strip().isdigit() else None

    def add_wireguard_link(self, ifname):
        self.run("ip", ["link", "add", "dev", ifname, "type", "wireguard"])

    def delete_link(self, ifname):
        self.run("ip", ["link", "del", "dev", ifname])

    def link_up(self, ifname, mtu):
        self.run("ip", ["link", "set", "dev", ifname, "mtu", str(mtu), "up"])

    def link_down(self, ifname):
        """No packet in or out of the link (the firewall's last resort when it cannot write its table)."""
        self.run("ip", ["link", "set", "dev", ifname, "down"])

    def replace_address(self, ifname, cidr):
        self.run("ip", [_family(cidr), "address", "replace", cidr, "dev", ifname])

    def addresses(self, ifname=None):
        """Read only: the addresses of the host (the firewall blocks their networks; a bridge address must
        not be on one), or of one link (what an adopted link holds), a line each."""
        return self.run("ip", ["-o", "address", "show"] + (["dev", ifname] if ifname else []))

    def flush_addresses(self, ifname):
        self.run("ip", ["-4", "address", "flush", "dev", ifname])

    # --- ip route and rule (bridge tables) ----------------------------------

    def default_routes6(self):
        """Read only: the main table's IPv6 default routes, a line each (none: IPv6 beyond the node is
        refused at once; wghelper/ipv6.py)."""
        return self.run("ip", ["-6", "route", "show", "default"])

    def route_default(self, table, ifname):
        self.run("ip", ["-4", "route", "replace", "default", "dev", ifname, "table", str(table)])

    def route_unreachable(self, table):
        self.run("ip", ["-4", "route", "replace", "unreachable", "default", "metric", UNREACHABLE_METRIC,
                        "table", str(table)])

    def flush_table(self, table):
        self.run("ip", ["-4", "route", "flush", "table", str(table)])

    def rules(self, pref):
        return self.run("ip", ["-4", "rule", "show", "pref", str(pref)])

    def add_rule(self, pref, address, table):
        self.run("ip", ["-4", "rule", "add", "pref", str(pref), "from", address + "/32", "lookup", str(table)])

    def delete_rule(self, pref, address):
        self.run("ip", ["-4", "rule", "del", "pref", str(pref), "from", address + "/32"])

    # --- nftables and sysctl ------------------------------------------------

    def apply_nft(self, script):
        """The table whole, or changes to its elements: what `nft -f -` would read, as one transaction."""
        self.nft_text(script)

    def delete_nft_table(self, name):
        self.run("nft", ["delete", "table", "inet", name])

    def list_quotas(self, name):
        """Read only, JSON: what each quota object of the table has counted (kept when it is written again).
        With libnftables, as `nft -j list quotas table inet NAME` prints it: asked at every usage count."""
        return self.nft_json(["list", "quotas", "table", "inet", name])

    def read_sysctl(self, key):
        return self.run("sysctl", ["-n", key]).strip()

    def write_sysctl(self, key, value):
        self.run("sysctl", ["-w", "%s=%s" % (key, value)])

    # --- wireguard-go ---------------------------------------------------------

    def start_wireguard_go(self, ifname):
        """``wireguard-go IF``: it creates the link and its control socket, then leaves a daemon behind
        and exits.  The daemon is nobody's child: it lives until its link is deleted.  Under systemd the
        main interface's daemon is a unit of its own (ORBMESH_WG_BACKEND=external); bridge links'
        daemons start here."""
        self.run("wireguard-go", [ifname])


def clean_stderr(data, secret=None):
    """Decode, drop anything we fed on stdin, and cut to STDERR_LIMIT chars."""
    text = (data.decode("utf-8", "replace") if isinstance(data, bytes) else data or "").strip()
    for part in (secret or "").split():
        if len(part) >= 8:
            text = text.replace(part, "[redacted]")
    return text[:STDERR_LIMIT] + "..." if len(text) > STDERR_LIMIT else text


class Deadlines:
    """One thread that kills every run past its deadline.

    A threading.Timer per run started and joined a thread on every wg and
    ip call: 0.7 ms of the 5.6 ms of CPU a run costs (docs/benchmarks.md).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._runs = {}  # key -> (deadline, expire)
        self._keys = itertools.count()
        self._thread = None

    def watch(self, seconds, expire):
        """Call expire() in `seconds` unless forget(key) comes first; returns the key."""
        with self._cond:
            if self._thread is None:
                # Its own thread because the runs it guards block their callers in the wait for the child.
                self._thread = threading.Thread(target=self._loop, name="run-deadlines", daemon=True)
                self._thread.start()
            key = next(self._keys)
            self._runs[key] = (time.monotonic() + seconds, expire)
            self._cond.notify()
            return key

    def forget(self, key):
        with self._cond:
            self._runs.pop(key, None)

    def _loop(self):
        while True:
            with self._cond:
                now = time.monotonic()
                due = [key for key, (deadline, _) in self._runs.items() if deadline <= now]
                if not due:
                    soonest = min((deadline for deadline, _ in self._runs.values()), default=None)
                    self._cond.wait(None if soonest is None else soonest - now)
                    continue
                expired = [self._runs.pop(key)[1] for key in due]
            for expire in expired:
                try:
                    expire()
                except Exception:  # the run ended meanwhile; this thread must live on for the others
                    log.exception("killing a command past its deadline failed")


class Runner:
    """Runs one argv with a deadline, LANG=C and a clean environment."""

    def __init__(self, timeout=10.0, wireguard_go="wireguard-go"):
        self.timeout = timeout
        self.programs = {"wireguard-go": wireguard_go}
        # LANG=C so the error texts we match and pass on are the English ones.
        self._env = {"LANG": "C", "PATH": os.environ.get("PATH") or DEFAULT_PATH}
        # No sh `_timeout`: sh then polls the child every 0.1 s, which added
        # ~100 ms to every wg/ip call (profiled by bench/control_plane.py);
        # run() enforces the deadline with Deadlines instead.  Output in 64 KiB
        # chunks, not line by line: halves reading a 10,000-peer dump.
        # No stdin pipe and feeder thread unless there is stdin to feed, and no
        # fd sweep in the forked child (Python opens every fd close-on-exec):
        # ~10% of the CPU of a `wg` run (docs/benchmarks.md).
        self._common = {"_tty_out": False, "_env": self._env, "_out_bufsize": 1 << 16, "_close_fds": False}
        self._null = os.open(os.devnull, os.O_RDONLY)
        self._tools = {}
        self._deadlines = Deadlines()
        self._nft = None
        self._nft_lock = threading.Lock()  # one libnftables context; the library is not thread-safe
        self._spawner, self._spawner_lock = None, threading.Lock()

    def _tool(self, name):
        # Looked up on first use: a helper without NAT must start on a host without nft.
        if name not in self._tools:
            try:
                self._tools[name] = sh.Command(self.programs.get(name, name)).bake(**self._common)
            except sh.CommandNotFound:
                raise CommandFailed(name, None, "not found in PATH") from None
        return self._tools[name]

    def run(self, tool, args, stdin=None):
        """Run one argv in the spawner (started on the first call): its stdout, or CommandFailed."""
        with self._spawner_lock:
            if self._spawner is None or not self._spawner.alive():
                if self._spawner is not None:
                    log.warning("the command spawner is gone; starting another")
                    self._spawner.close()
                self._spawner = Spawner(self)
            spawner = self._spawner
        return spawner.call(tool, args, stdin, self.timeout + SPAWNER_GRACE)

    def close(self):
        """End the spawner, if one runs: its commands still running are left to finish on their own."""
        with self._spawner_lock:
            spawner, self._spawner = self._spawner, None
        if spawner is not None:
            spawner.close()

    def run_here(self, tool, args, stdin=None, out=None):
        """Run one argv with sh in this process, killed past the deadline: what the spawner does.
        With `out` (a descriptor), the command's stdout goes there and this returns ""."""
        extra = {} if out is None else {"_out": out}
        running = self._tool(tool)(*args, _in=self._null if stdin is None else stdin, _bg=True, _bg_exc=False,
                                   **extra)
        fired = []

        def expire():
            if running.process.is_alive()[0]:
                fired.append(True)
                running.signal(signal.SIGKILL)

        key = self._deadlines.watch(self.timeout, expire)
        try:
            running.wait()
            return str(running)
        except sh.ErrorReturnCode as exc:
            if fired:
                raise CommandFailed(tool, None, "timed out after %gs" % self.timeout) from None
            raise CommandFailed(tool, exc.exit_code, clean_stderr(exc.stderr, stdin)) from None
        finally:
            self._deadlines.forget(key)

    def nft_text(self, text):
        """Apply nftables `text` with libnftables in this process: one transaction, as `nft -f -`.

        A run of nft cost ~12 ms of CPU (fork, exec, the library's start-up) however small the
        change, and the writer makes one for every round that holds tiered connects; in this
        process the same change costs ~1 ms (docs/benchmarks.md, "Where the tiers' CPU went").
        No deadline: a library call cannot be killed, but it only speaks netlink to this kernel.
        The ruleset holds no secret, and its errors quote it: they are passed on as nft prints them.
        """
        with self._nft_lock:
            self._library()
            # Read from a file, not a buffer: libnftables 1.0.6 quotes the buffer's first line for an
            # error on any line; for a file it quotes the line that failed, as `nft -f -` does.
            fd = os.memfd_create("nft", os.MFD_CLOEXEC)
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(fd, data):]
                path = "/proc/self/fd/%d" % fd
                code, _, error = self._nft.cmd_from_file(path)
            finally:
                os.close(fd)
        if code != 0:
            raise CommandFailed("nft", code, clean_stderr(error.replace(path, "input")))

    def nft_json(self, words):
        """A listing with libnftables in this process, as `nft -j WORDS...` prints it: the quota listing
        took 6.6 ms of CPU as a run of nft and 0.2 ms here with 10 quotas, 93 and 62 ms with 10,000
        (docs/benchmarks.md).  `words` are fixed words and names from the settings."""
        with self._nft_lock:
            nft = self._library()
            nft.set_json_output(True)
            try:
                code, out, error = nft.cmd(" ".join(words))
            finally:
                nft.set_json_output(False)
        if code != 0:
            raise CommandFailed("nft", code, clean_stderr(error))
        return out

    def _library(self):
        """The libnftables context (call under _nft_lock).  Loaded on first use, like the programs: a
        helper without NAT or limits needs none."""
        if self._nft is None:
            try:
                import nftables
                self._nft = nftables.Nftables()
            except (ImportError, OSError) as exc:
                raise CommandFailed("nft", None, "libnftables unavailable: %s" % exc) from None
        return self._nft


FD_SIZE = 4  # an int in SCM_RIGHTS
SPAWNER_GRACE = 5.0  # seconds past a command's own deadline before the helper stops waiting for its answer


class Spawner:
    """A child of the helper that runs each argv with sh, forked at the helper's first command.

    sh forks the process that calls it and runs Python in the child before the exec, so a run costs
    more CPU the more memory that process maps: 5.2 ms from a 22 MB process, 8.3-8.8 ms from a 168 MB
    one (docs/benchmarks.md, "What a run of wg costs").  The helper grows with the peer count (145-171 MB
    at 60,000 peers); the spawner stays the size it was forked at, so a `wg set` costs the same at any
    peer count.  Each command comes with a socket pair of its own for the request and the answer,
    and a memfd for its stdout (both by SCM_RIGHTS): concurrent commands need no ids.  It exits when
    the helper's end of the control socket closes, with the helper or on close().
    """

    def __init__(self, runner):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child; tests see it through call()
            try:
                parent.close()
                serve_spawner(child, runner)
            finally:
                os._exit(0)
        child.close()
        self._control, self._lock = parent, threading.Lock()
        self._gone = False  # it closed its end: run() starts another even before it can be reaped

    def alive(self):
        if self._gone:
            return False
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def call(self, tool, args, stdin, wait):
        # The command's stdout goes to a memfd the helper reads: a 60,000-peer dump (10 MB) never passes
        # through the spawner's heap, which would keep it (glibc) and make every later fork dearer.
        out = os.memfd_create("wghelper-out", os.MFD_CLOEXEC)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with theirs:
                try:
                    with self._lock:
                        socket.send_fds(self._control, [b"r"], [theirs.fileno(), out])
                except OSError as exc:
                    self._gone = True
                    raise CommandFailed(tool, None, "the command spawner is gone: %s" % exc.strerror) from None
            mine.settimeout(wait)
            mine.sendall(json.dumps({"tool": tool, "args": list(args), "stdin": stdin}).encode())
            mine.shutdown(socket.SHUT_WR)
            answer = _read_all(mine)
            if not answer:
                self._gone = True
                raise CommandFailed(tool, None, "the command spawner ended during the command")
            answer = json.loads(answer)
            if "exit_code" in answer:
                raise CommandFailed(tool, answer["exit_code"], answer["stderr"])
            return _read_file(out).decode("utf-8", "replace")
        except socket.timeout:
            raise CommandFailed(tool, None, "no answer from the command spawner in %gs" % wait) from None
        except OSError as exc:
            raise CommandFailed(tool, None, "the command spawner failed: %s" % exc.strerror) from None
        finally:
            mine.close()
            os.close(out)

    def close(self):
        self._control.close()
        try:
            os.waitpid(self.pid, 0)  # it exits on the closed control socket; nothing else to wait for
        except ChildProcessError:
            pass


def _read_file(fd):
    # One read of the size the command wrote: a 10 MB dump is held once as bytes, not as chunks too.
    data, size = b"", os.fstat(fd).st_size
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_all(sock):
    chunks = []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def serve_spawner(control, runner):
    """The spawner's loop: one thread per command, as the helper's threads each wait for their own."""
    # The helper decides when to stop; the spawner ends with the helper's end of the control socket.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        # Close-on-exec as it arrives (socket.recv_fds drops its flags on 3.11): a command forked by
        # another thread meanwhile must not hold this socket open, or its answer would never end.
        _, ancillary, _, _ = control.recvmsg(1, socket.CMSG_SPACE(2 * FD_SIZE), socket.MSG_CMSG_CLOEXEC)
        fds = [int.from_bytes(data[i:i + FD_SIZE], sys.byteorder) for level, kind, data in ancillary
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for i in range(0, len(data) - len(data) % FD_SIZE, FD_SIZE)]
        if len(fds) != 2:  # the helper's end closed (no descriptors), or not the helper: nothing to serve
            for fd in fds:
                os.close(fd)
            if not fds:
                return
            continue
        # A thread because the command blocks this one (fork, exec, wait) and others must run meanwhile.
        threading.Thread(target=_serve_command, args=(socket.socket(fileno=fds[0]), fds[1], runner),
                         name="spawner-command", daemon=True).start()


def _serve_command(sock, out, runner):
    with sock:
        try:
            request = json.loads(_read_all(sock))
            runner.run_here(request["tool"], request["args"], request["stdin"], out=out)
            answer = {}
        except CommandFailed as exc:
            answer = {"exit_code": exc.exit_code, "stderr": exc.stderr}
        except Exception as exc:  # the helper must get an answer whatever went wrong here
            answer = {"exit_code": None, "stderr": "the command spawner failed: %s" % type(exc).__name__}
        finally:
            os.close(out)
        try:
            sock.sendall(json.dumps(answer).encode())
        except OSError:
            pass  # the helper stopped waiting
