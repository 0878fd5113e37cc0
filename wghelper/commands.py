"""The only place that runs programs.  Everything else calls a Runner.

Arguments reaching here have already been validated and normalised by the
handlers; this module adds no shell, no string joining and no name lookups.
Secrets never go into an argv: private keys travel on stdin or as a path.
"""
import logging
import os
import signal
import threading

import sh

log = logging.getLogger(__name__)

STDERR_LIMIT = 500
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandFailed(Exception):
    """wg, ip, nft, sysctl or wireguard-go exited non-zero, timed out or could not start."""

    def __init__(self, command, exit_code, stderr):
        super().__init__("%s failed (exit %s): %s" % (command, exit_code, stderr))
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr

    def details(self):
        return {"command": self.command, "exit_code": self.exit_code, "stderr": self.stderr}


def clean_stderr(data, secret=None):
    """Decode, drop anything we fed on stdin, and cut to STDERR_LIMIT chars."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    text = (data or "").strip()
    if secret:
        for part in secret.split():
            if len(part) >= 8:
                text = text.replace(part, "[redacted]")
    if len(text) > STDERR_LIMIT:
        text = text[:STDERR_LIMIT] + "..."
    return text


class Child:
    """A supervised wireguard-go process; signalled only by its own pid."""

    def __init__(self, name, running):
        self.name = name
        self._running = running
        self.pid = running.pid

    def alive(self):
        # is_alive() reaps the process once it has exited, after which
        # exit_code is set and we never signal that (possibly reused) pid again.
        return self._running.process.is_alive()[0]

    def exit_code(self):
        return self._running.process.exit_code

    def stop(self, timeout=5.0):
        if not self.alive():
            return self.exit_code()
        log.info("stopping %s (pid %d)", self.name, self.pid)
        self._running.signal(signal.SIGTERM)
        try:
            self._running.wait(timeout=timeout)
        except sh.TimeoutException:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.pid)
            if self.alive():
                self._running.signal(signal.SIGKILL)
            try:
                self._running.wait()
            except sh.ErrorReturnCode:
                pass
        except sh.ErrorReturnCode:
            pass  # a non-zero exit after SIGTERM is fine; we asked it to stop
        return self.exit_code()


class _Deadline:
    """Kill a running command (by its own pid, only while it is alive) after `timeout` seconds."""

    def __init__(self, running, timeout):
        self.fired = False
        self._running = running
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self):
        if self._running.process.is_alive()[0]:
            self.fired = True
            self._running.signal(signal.SIGKILL)

    def cancel(self):
        self._timer.cancel()


class Runner:
    def __init__(self, timeout=10.0, wireguard_go="wireguard-go"):
        self.timeout = timeout
        # LANG=C so the error texts we match and pass on are the English ones.
        self._env = {"LANG": "C", "PATH": os.environ.get("PATH") or DEFAULT_PATH}
        # No sh `_timeout`: sh then polls the child every 0.1 s, which added
        # ~100 ms to every wg/ip call (profiled by bench/control_plane.py).
        # _run enforces the timeout with a timer instead.
        # Output in 64 KiB chunks, not sh's default of line by line: halves the
        # time to read a 10,000-peer `wg show dump`.
        common = {"_tty_out": False, "_env": self._env, "_out_bufsize": 1 << 16}
        try:
            self._wg = sh.Command("wg").bake(**common)
            self._ip = sh.Command("ip").bake(**common)
        except sh.CommandNotFound as exc:
            raise CommandFailed(str(exc), None, "not found in PATH") from None
        self._wireguard_go = wireguard_go
        self._common = common
        self._optional = {}

    def wg(self, *args, stdin=None):
        return self._run("wg", self._wg, args, stdin)

    def ip(self, *args):
        return self._run("ip", self._ip, args, None)

    # nft and sysctl are looked up on first use: only NAT needs them, and a
    # helper without ORBMESH_NAT_UPLINK must start on a host without nft.

    def nft(self, *args, stdin=None):
        # The ruleset on stdin holds no secret, and nft's errors quote it:
        # keep them readable (no redaction).
        return self._run("nft", self._tool("nft"), args, stdin, redact=False)

    def sysctl(self, *args):
        return self._run("sysctl", self._tool("sysctl"), args, None)

    def _tool(self, name):
        if name not in self._optional:
            try:
                self._optional[name] = sh.Command(name).bake(**self._common)
            except sh.CommandNotFound:
                raise CommandFailed(name, None, "not found in PATH") from None
        return self._optional[name]

    def _run(self, name, command, args, stdin, redact=True):
        kwargs = {} if stdin is None else {"_in": stdin}
        running = command(*args, _bg=True, _bg_exc=False, **kwargs)
        timer = _Deadline(running, self.timeout)
        try:
            running.wait()
            return str(running)
        except sh.ErrorReturnCode as exc:
            if timer.fired:
                raise CommandFailed(name, None, "timed out after %gs" % self.timeout) from None
            stderr = clean_stderr(exc.stderr, stdin if redact else None)
            raise CommandFailed(name, exc.exit_code, stderr) from None
        finally:
            timer.cancel()

    def start_wireguard_go(self, ifname):
        """Start ``wireguard-go IFNAME`` as a foreground child we supervise."""
        env = dict(self._env, WG_PROCESS_FOREGROUND="1")

        def relay(line):
            log.info("wireguard-go[%s]: %s", ifname, line.rstrip())

        try:
            command = sh.Command(self._wireguard_go)
            running = command(ifname, _bg=True, _bg_exc=False, _env=env, _tty_out=False,
                              _out=relay, _err_to_out=True, _new_session=True)
        except sh.CommandNotFound:
            raise CommandFailed("wireguard-go", None, "%s not found" % self._wireguard_go) from None
        except OSError as exc:
            raise CommandFailed("wireguard-go", None, str(exc)) from None
        log.info("started wireguard-go for %s (pid %d)", ifname, running.pid)
        return Child("wireguard-go", running)
