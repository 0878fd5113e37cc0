"""Closed-loop load: N client threads, each repeating one cycle until told to stop.

Each client keeps one HTTP/1.1 keep-alive connection whose socket was made
inside the client namespace.  A cycle in flight when the time is up is
finished (and counted); none is started afterwards.
"""
import http.client
import json
import socket
import threading
import time

from .common import SERVER_ADDR
from tests.e2e.stack import API_PORT


class Client:
    """One keep-alive HTTP connection to the API from a namespace."""

    def __init__(self, ns, timeout=30):
        self.ns = ns
        self.timeout = timeout
        self.conn = None

    def _open(self):
        ns, timeout = self.ns, self.timeout

        class Connection(http.client.HTTPConnection):
            def connect(self):
                self.sock = ns.socket_in(socket.AF_INET, socket.SOCK_STREAM)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sock.settimeout(timeout)
                self.sock.connect((SERVER_ADDR, API_PORT))

        self.conn = Connection(SERVER_ADDR, API_PORT, timeout=timeout)

    def connect(self):
        """Open the connection now, not on the first request (whose timing would then include it)."""
        if self.conn is None:
            self._open()
        self.conn.connect()
        return self

    def request(self, method, path, body=None, headers=None):
        """(status, parsed JSON or None, seconds); reconnects once if the server closed the connection."""
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(headers or {})
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self.conn is None:
                self._open()
            started = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            elapsed = time.perf_counter() - started
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return response.status, parsed, elapsed

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def closed_loop(cycle, clients, duration):
    """Run cycle(i, stop) on `clients` threads for `duration` seconds.

    cycle returns a dict of {series: [seconds, ...]} for what it completed
    and may return None when it gave up because of stop.  Returns
    (series merged over all threads, errors, elapsed seconds).
    """
    stop = threading.Event()
    merged, errors, lock = {}, [], threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    last_done = [0.0]

    def worker(i):
        start_gate.wait()
        while not stop.is_set():
            try:
                got = cycle(i, stop)
            except Exception as exc:  # counted, the run goes on
                with lock:
                    errors.append(repr(exc)[:200])
                time.sleep(0.05)
                continue
            if got is None:
                continue
            now = time.perf_counter()
            with lock:
                last_done[0] = max(last_done[0], now)
                for name, values in got.items():
                    merged.setdefault(name, []).extend(values)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    started = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    elapsed = max(last_done[0], started + 1e-9) - started
    return merged, errors, elapsed
