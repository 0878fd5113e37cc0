"""A stand-in exit API on loopback that answers slowly: one byte every `interval` seconds.

It records each request (method, path, headers, JSON body) and sets
`received` when one has arrived; `finished` is set only when a reply has
gone out whole, so a test can prove its own call ended before that.
`stop()` ends the drip early and closes the listener.
"""
import json
import socket
import ssl
import threading

REPLY = b'{"success": true, "message": "Peer removed successfully", "removed": 1}'


class SlowExit:
    def __init__(self, interval=0.5, reply=REPLY, tls=None):
        self.interval = interval
        self.reply = reply
        self.tls = tls  # (cert.pem, key.pem) to serve https
        self.requests = []
        self.received = threading.Event()
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.port)

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            if self.tls:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(*self.tls)
                conn = context.wrap_socket(conn, server_side=True)
            stream = conn.makefile("rb")
            request_line = stream.readline().decode().split()
            headers = {}
            for line in iter(stream.readline, b"\r\n"):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            raw = stream.read(int(headers.get("content-length", 0)))
            self.requests.append((request_line[0], request_line[1], headers, json.loads(raw) if raw else None))
            self.received.set()
            answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n" % len(self.reply)) + self.reply
            for index in range(len(answer)):
                if self._stop.wait(self.interval if index else 0):
                    return
                conn.sendall(answer[index:index + 1])
            self.finished.set()
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def stop(self):
        self._stop.set()
        self._listener.close()
