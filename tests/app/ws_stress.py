"""100,000 frames server-to-client with pings in between, under gevent.

Run as ``python -m tests.app.ws_stress CLASS`` so that gevent patches the
process first, as gunicorn's gevent worker does: that is where a plain
``socket.send()`` writes part of a frame and a ping lands in the middle.
Prints one line, ``frames=N in_order=BOOL pings=N errors=[...]``, which the
test reads; exit 0 either way.
"""
from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping  # noqa: E402
from wsproto.utilities import LocalProtocolError, RemoteProtocolError  # noqa: E402

from app.wsconn import TunnelWebSocket  # noqa: E402
from tests.app.wspair import pair  # noqa: E402

TOTAL = 100_000


class SingleSend(TunnelWebSocket):
    """simple-websocket's own way to write: one send(), no lock (the hazard)."""

    def _write(self, event):
        data = self.ws.send(event)
        if data:
            self.sock.send(data)


def stress(server_class):
    """Return (frames received, in order?, pings seen, errors)."""
    server, client, sock = pair(server_class=server_class)
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.settimeout(20)
    while not any(isinstance(e, AcceptConnection) for e in _feed(client, sock)):
        pass
    done = threading.Event()

    def push():
        try:
            for i in range(TOTAL):
                server.send(struct.pack("!I", i) + bytes(28 + (i * 7919) % 1500))
                if i % 64 == 0:
                    time.sleep(0)  # yield, as the real sender does while it waits for UDP
        except Exception:  # the reader below reports what went wrong
            pass
        done.set()

    def ping():
        # What the connection's reader thread does at every ping interval,
        # here as often as possible: a second writer racing the data frames.
        # (No ping interval is set, so a late pong can never close the
        # connection on a loaded machine.)
        while not done.is_set():
            try:
                server._write(Ping(b"stress"))
            except Exception:
                return
            time.sleep(0.001)

    pusher = threading.Thread(target=push)
    pinger = threading.Thread(target=ping)
    pusher.start()
    pinger.start()
    received, errors, pings, partial = [], [], 0, bytearray()
    try:
        while len(received) < TOTAL:
            events = _feed(client, sock)
            if events is None:
                errors.append("server closed the connection after %d frames" % len(received))
                break
            for event in events:
                if isinstance(event, Ping):
                    pings += 1
                    sock.sendall(client.send(event.response()))
                elif isinstance(event, BytesMessage):
                    # wsproto hands over a frame in pieces as they arrive.
                    partial += event.data
                    if event.message_finished:
                        received.append(struct.unpack("!I", partial[:4])[0])
                        partial = bytearray()
                elif isinstance(event, CloseConnection):
                    errors.append("closed with %s" % event.code)
            if errors:
                break
    except (LocalProtocolError, RemoteProtocolError, OSError) as exc:
        errors.append(repr(exc))
    done.set()
    sock.close()  # so a writer blocked on a full socket fails at once
    pusher.join(timeout=30)
    pinger.join(timeout=30)
    in_order = received == list(range(len(received)))
    return len(received), in_order, pings, errors


def _feed(client, sock):
    data = sock.recv(1 << 20)
    if not data:
        return None
    client.receive_data(data)
    return list(client.events())


if __name__ == "__main__":
    cls = {"TunnelWebSocket": TunnelWebSocket, "SingleSend": SingleSend}[sys.argv[1]]
    count, in_order, pings, errors = stress(cls)
    print("frames=%d in_order=%s pings=%d errors=%s" % (count, in_order, pings, errors[:1]))
