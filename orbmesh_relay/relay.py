"""Relay: one local UDP port, one transport to the server and the threads
that move datagrams between them (docs/tunnel-protocol.md).

The transports (ws.py, http.py) get the relay passed in and use only its
attributes and the parts in common.py; they never import this module.
"""
import logging
import os
import threading
import time

from .common import Backoff, LocalPort, Stats, Unauthorized
from .framing import MIN_WIREGUARD
from .http import HttpTransport
from .ws import WsTransport

log = logging.getLogger(__name__)

TRANSPORTS = {"ws": WsTransport, "http": HttpTransport}


def transport_class(name):
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise ValueError("unknown transport %r" % name) from None


class Relay:
    """One relay: a local port, a transport and its threads.

    Tests drive this directly; cli.run() adds signals and the status printer.
    """

    def __init__(self, transport, url, token, listen, *, ssl_context=None, http_senders=1,
                 session=None, backoff_first=0.5):
        self.transport_name = transport
        self.url = url
        self.token = token
        self.ssl_context = ssl_context
        self.http_senders = http_senders
        self.session = session or "relay-" + os.urandom(8).hex()
        self.backoff_first = backoff_first
        self.stats = Stats()
        self.stopping = threading.Event()
        self.fatal = None
        self.local = LocalPort(*listen)
        self.transport = transport_class(transport)(self)
        self._threads = []

    def start(self):
        for target, name in self.transport.workers():
            thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _guard(self, target):
        try:
            target()
        except Unauthorized as exc:
            self.fail(str(exc))
        except Exception:
            if not self.stopping.is_set():
                log.exception("relay thread %s died", threading.current_thread().name)
                self.fail("internal error in %s" % threading.current_thread().name)

    def backoff(self):
        return Backoff(first=self.backoff_first)

    def local_batches(self):
        """Lists of the datagrams local WireGuard sent, until the relay stops.

        Datagrams shorter than the smallest WireGuard message are counted as
        dropped: a batch cannot carry one (framing.MIN_WIREGUARD; the server
        refuses the whole batch), and the server would drop it anyway.
        """
        while not self.stopping.is_set():
            try:
                batch = self.local.receive_many()
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            short = sum(1 for data in batch if len(data) < MIN_WIREGUARD)
            if short:
                self.stats.drop(short)
                batch = [data for data in batch if len(data) >= MIN_WIREGUARD]
            if batch:
                yield batch

    def deliver(self, datagrams):
        """Datagrams from the server, to local WireGuard."""
        packets, size = self.local.send(datagrams)
        if packets:
            self.stats.down(packets, size)
        if packets < len(datagrams):
            self.stats.drop(len(datagrams) - packets)

    def fail(self, message):
        if self.fatal is None:
            self.fatal = message
        self.stopping.set()

    def status_line(self):
        return self.stats.line(self.transport_name)

    def stop(self, timeout=5.0):
        self.stopping.set()
        self.transport.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.local.close()
        self.stats.set_connected(False)
