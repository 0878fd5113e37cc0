"""The Unix socket the app talks to: one thread per connection.

The kernel's SO_PEERCRED tells us who connected before we read a byte;
anyone not in ORBMESH_HELPER_ALLOWED_UIDS gets FORBIDDEN and is dropped.
"""
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import threading

from . import handlers, protocol, validate
from .errors import ProtocolError

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0


def _hung_up(conn):
    """Whether the client has closed its socket altogether (not just its sending side)."""
    poller = select.poll()
    poller.register(conn.fileno(), 0)  # POLLHUP is always reported
    return any(event & select.POLLHUP for _, event in poller.poll(0))


class Server:
    def __init__(self, settings, ctx, idle_timeout=IDLE_TIMEOUT, dispatch=handlers.dispatch):
        self.settings = settings
        self.ctx = ctx
        self.path = settings.helper_socket
        self.idle_timeout = idle_timeout
        self._dispatch = dispatch
        self._slots = threading.BoundedSemaphore(settings.helper_max_connections)
        self._batch = threading.Lock()
        self._items = min(settings.pool.num_addresses, validate.MAX_PEERS)
        self._stop = threading.Event()
        self._listener = None
        self._inode = None
        self._conns = set()

    def bind(self):
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        self.remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bind() makes it 0660 (nobody connects before listen()); the group is set without following a
        # symlink, so a path swapped for one in between changes nothing else.
        old_umask = os.umask(0o117)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        if self.settings.helper_socket_group is not None:
            os.chown(self.path, -1, self.settings.helper_socket_group, follow_symlinks=False)
        listener.listen(128)
        listener.settimeout(0.5)  # so serve_forever notices stop()
        self._inode = os.lstat(self.path).st_ino
        self._listener = listener
        log.info("listening on %s", self.path)

    def remove_stale(self):
        """Remove a socket no helper answers on; OSError when one does."""
        try:
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(errno.EEXIST, "%s exists and is not a socket" % self.path)
        except FileNotFoundError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing stale socket %s", self.path)
                os.unlink(self.path)
                return
        raise OSError(errno.EADDRINUSE, "another helper is listening on %s" % self.path)

    def stop(self):
        """Ask serve_forever to return; safe to call from a signal handler."""
        self._stop.set()

    def close(self):
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() now
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def serve_forever(self):
        listener = self._listener
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set() or listener.fileno() == -1:
                    break
                log.error("accept failed: %s", exc)
                self._stop.wait(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("refusing a connection: %d already open", self.settings.helper_max_connections)
                conn.close()
                continue
            # A thread per connection because its requests block: on the writer's round, a dump, a bridge's
            # `ip` and `wg` runs.
            threading.Thread(target=self._serve, args=(conn,), name="wg-conn", daemon=True).start()

    def _serve(self, conn):
        self._conns.add(conn)
        try:
            self._handle(conn)
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _handle(self, conn):
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        if uid not in self.settings.helper_allowed_uids:
            log.warning("refused pid %d uid %d: not in ORBMESH_HELPER_ALLOWED_UIDS", pid, uid)
            self._send(conn, protocol.error(None, protocol.FORBIDDEN, "uid %d may not use this helper" % uid))
            return
        conn.settimeout(self.idle_timeout)
        with conn.makefile("rb") as reader:
            while not self._stop.is_set():
                try:
                    head = reader.readline(protocol.SMALL_FRAME + 1)
                    # A request longer than SMALL_FRAME (a batch) is read, parsed and run by one connection at
                    # a time, so the memory it takes counts once (wghelper/protocol.py).
                    with self._batch if len(head) > protocol.SMALL_FRAME else contextlib.nullcontext():
                        line = protocol.read_request(reader, head, self._items)
                        if line is None:
                            return
                        if _hung_up(conn):
                            # The app gave up waiting (say, this helper was stopped) and has undone its
                            # side: running it now would leave a change the database does not have.
                            log.warning("client hung up before its request was run; dropped it")
                            return
                        if not self._send(conn, self._answer(line)):
                            return
                except ProtocolError as exc:
                    # Oversized or cut short: the stream is out of step, so answer once and hang up.
                    self._send(conn, protocol.error(None, exc.code, exc.message))
                    return
                except OSError:  # idle timeout, reset
                    return

    def _answer(self, line):
        req_id = None
        try:
            message = protocol.decode(line)
            req_id = message["id"] if type(message.get("id")) is int else None  # echoed even if the rest is bad
            req_id, cmd, args = protocol.parse_request(message)
        except ProtocolError as exc:
            return protocol.error(req_id, exc.code, exc.message)
        try:
            return self._dispatch(self.ctx, req_id, cmd, args)
        except Exception:
            log.exception("dispatch of %s failed", cmd[:40])
            return protocol.error(req_id, protocol.INTERNAL, "internal error; see the helper's log")

    @staticmethod
    def _send(conn, reply):
        try:
            data = protocol.encode(reply)
        except ProtocolError as exc:
            data = protocol.encode(protocol.error(reply.get("id"), exc.code, "reply too large: %s" % exc.message))
        try:
            conn.sendall(data)
            return True
        except OSError:
            return False
