"""The WireGuard interface: bring it up like wg-quick, watch it, tear it down.

The interface is not the helper's: it outlives every helper process, so
clients keep their sessions across a restart or a crash.  Starting adopts
a link that already has our key, listen port and gateway address exactly
as it is (nothing is set again, deleted or flushed); anything else is
re-created, which costs every client a new handshake.  Only ``down()``
(``orbmesh-wghelper down``) removes it.

With ORBMESH_WG_BACKEND=external the link is someone else's to make:
under systemd, orbmesh-wireguard-go@IF.service runs wireguard-go (the
helper cannot reach systemd, docs/security.md).  The helper then only waits
for the link, configures it (key, port, addresses) and never creates or
deletes it, except in ``down()``; when the unit's restart brings a fresh,
unconfigured link, the watcher configures it again.

The helper keeps no peers.  Each start and each re-creation picks a new
``generation``; the app notices the change and syncs the peers.
"""
import logging
import os
import re
import secrets
import threading
import time

from .errors import CommandFailed
from .peers import parse_dump

log = logging.getLogger(__name__)

WG_SOCKET_DIR = "/var/run/wireguard"
# What `ip link add ... type wireguard` says when the kernel has no module.
_NO_KERNEL_RE = re.compile(r"unknown device type|not supported|no such device", re.IGNORECASE)


class Interface:
    def __init__(self, settings, cmd, key_path, public_key=None, socket_dir=WG_SOCKET_DIR, start_timeout=10.0,
                 name=None):
        self.name = name or settings.interface
        self.settings = settings
        self.cmd = cmd
        self.key_path = key_path
        self.public_key = public_key
        self.socket_dir = socket_dir
        self.start_timeout = start_timeout
        self.generation = None
        self.backend = None
        self.index = None  # the link's ifindex when it came up: a re-made link has another
        # Bridge links (name given) are always the helper's own to make.
        self.external = name is None and settings.wg_backend == "external"
        self.running = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watcher = None
        # Called after each successful bring-up (also the watcher's
        # re-creations); a failure tears the interface down like a failed
        # configure.  The firewall uses it to set per-interface forwarding again.
        self.on_up = None

    @property
    def uapi_socket(self):
        return os.path.join(self.socket_dir, self.name + ".sock")

    def exists(self):
        return self.cmd.link_index(self.name) is not None

    def up(self):
        """Adopt the interface as it is, or create (external: wait for) and configure it; new generation."""
        with self._lock:
            exists = self.exists()
            unfit = exists and self._unfit()
            if unfit and not self.external:
                log.warning("interface %s %s; re-creating it (its clients handshake again)", self.name, unfit)
                self._delete_link()
            adopted = exists and not unfit
            if adopted:
                self._name_backend()
                log.info("adopting interface %s (%s) as it is", self.name, self.backend)
            elif self.external:
                self._await_link()
            else:
                self._create()
            try:
                self._configure(adopted)
                self.index = self.cmd.link_index(self.name)
                if self.on_up is not None:
                    self.on_up()
            except Exception:
                if not adopted:  # what this call created goes again; an adopted one keeps its clients
                    self._teardown()
                raise
            self.generation = secrets.token_hex(8)
            self.running = True
            log.info("interface %s is up (backend %s, generation %s)", self.name, self.backend, self.generation)

    def _name_backend(self):
        self.backend = "wireguard-go" if os.path.exists(self.uapi_socket) else "kernel"

    def _await_link(self):
        """External backend: the link's own unit makes it (and, for wireguard-go, its control socket)."""
        deadline = time.monotonic() + self.start_timeout
        while not self._ready():
            if time.monotonic() > deadline:
                raise CommandFailed("ip", None, "no interface %s after %gs (ORBMESH_WG_BACKEND=external: is "
                                    "orbmesh-wireguard-go@%s.service running?)" % (self.name, self.start_timeout,
                                                                                   self.name))
            time.sleep(0.05)
        self._name_backend()

    def _unfit(self):
        """Why the existing link cannot be adopted as it is; None when it can.

        Without a public key to compare (a bridge link: its _configure sets
        its peer and address to the spec again) any link wg controls will do.
        """
        s = self.settings
        try:
            info = parse_dump(self.cmd.dump(self.name))[0]
        except CommandFailed:
            return "exists but wg cannot control it"
        if self.public_key is None:
            return None
        if (info["public_key"], info["listen_port"]) != (self.public_key, s.listen_port):
            return "has another key or listen port"
        if "inet %s/%d " % (s.gateway, s.pool.prefixlen) not in self.cmd.addresses(self.name):
            return "has another address"
        return None

    def _create(self):
        backend = self.settings.wg_backend
        if backend != "userspace":
            try:
                self.cmd.add_wireguard_link(self.name)
                self.backend = "kernel"
                return
            except CommandFailed as exc:
                if backend == "kernel" or not _NO_KERNEL_RE.search(exc.stderr):
                    raise
                log.info("kernel has no WireGuard (%s); using %s", exc.stderr, self.settings.wireguard_go)
        self.cmd.start_wireguard_go(self.name)
        # It returns once the link and its control socket exist; wait a little in case they lag.
        deadline = time.monotonic() + self.start_timeout
        while not self._ready(wireguard_go=True):
            if time.monotonic() > deadline:
                self._delete_link()
                raise CommandFailed("wireguard-go", None, "no interface after %gs" % self.start_timeout)
            time.sleep(0.05)
        self.backend = "wireguard-go"

    def _ready(self, wireguard_go=False):
        """The link exists and wg can reach it: wireguard-go makes its control socket after the link."""
        if not self.exists():
            return False
        if wireguard_go:
            return os.path.exists(self.uapi_socket)
        try:
            self.cmd.dump(self.name)
            return True
        except CommandFailed:
            return False

    def _configure(self, adopted):
        s = self.settings
        if not adopted:  # set again, a listen port would rebind wireguard-go's socket
            self.cmd.set_interface(self.name, s.listen_port, self.key_path)
        self.cmd.replace_address(self.name, "%s/%d" % (s.gateway, s.pool.prefixlen))
        if s.pool6:
            self.cmd.replace_address(self.name, "%s/%d" % (s.gateway6, s.pool6.prefixlen))
        self.cmd.link_up(self.name, s.mtu)

    def _delete_link(self):
        try:
            self.cmd.delete_link(self.name)
        except CommandFailed as exc:
            log.warning("could not delete %s: %s", self.name, exc.stderr)

    def _teardown(self):
        # A wireguard-go daemon exits, taking its control socket along, when its link is deleted.
        # An external link is left to its unit, but in down().
        self.running = False
        if not self.external and self.exists():
            self._delete_link()

    def check(self):
        """One watcher tick: re-create (external: configure again) the interface if it has gone or
        is another link of the same name."""
        with self._lock:
            if self._stop.is_set():
                return
            index = self.cmd.link_index(self.name)
            if self.running and index is not None and index == self.index:
                return
            if self.running:
                log.warning("interface %s has gone or was made again; %s", self.name,
                            "configuring it when its unit brings it back" if self.external else "re-creating it")
            self._teardown()
            if self.external and index is None:
                return  # nothing to configure yet: the next tick looks again
            try:
                self.up()
            except CommandFailed as exc:
                log.error("could not re-create %s: %s; retrying in %gs", self.name, exc,
                          self.settings.helper_watch_interval)

    def start_watcher(self):
        def watch():
            while not self._stop.wait(self.settings.helper_watch_interval):
                try:
                    self.check()
                except Exception:
                    log.exception("interface watcher failed; it keeps running")

        # Its own thread because check() blocks: `ip link show` every tick, `ip link add` and `wg setconf` to
        # re-create the interface.
        self._watcher = threading.Thread(target=watch, name="wg-watcher", daemon=True)
        self._watcher.start()

    def stop(self):
        """At helper stop: stop watching, and leave the interface as it is."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def down(self):
        """Stop watching, then remove the interface (a wireguard-go daemon exits with it).  Raises
        CommandFailed while the link is still there: what guards it (the firewall's table) must stay."""
        self.stop()
        with self._lock:
            self.running = False
            try:
                if self.exists():
                    self.cmd.delete_link(self.name)
            except CommandFailed:
                if self.exists():  # not just gone meanwhile (a wireguard-go daemon exiting)
                    raise
            log.info("interface %s is down", self.name)
