"""100,000 frames server-to-client with pings in between, under gevent.

Run as ``python -m tests.app.tunnel.ws_stress`` so that gevent patches the process
first, as gunicorn's gevent worker does.  A greenlet writes 100,000
numbered datagrams into the session's pipe (blocking when the session
falls behind, so none is lost); the client reads every frame and answers
every ping.  Prints one line, ``frames=N in_order=BOOL pings=N errors=[...]``,
which the test reads; exit 0 either way.
"""
from gevent import monkey

monkey.patch_all()

import struct  # noqa: E402
import threading  # noqa: E402

from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping  # noqa: E402
from wsproto.utilities import LocalProtocolError, RemoteProtocolError  # noqa: E402

from tests.app.tunnel.wspair import Session  # noqa: E402

TOTAL = 100_000


def stress():
    """Return (frames received, in order?, pings seen, errors)."""
    session = Session(ping_interval=0.05)
    client, sock = session.client, session.sock
    sock.settimeout(20)
    while not any(isinstance(e, AcceptConnection) for e in _feed(client, sock)):
        pass

    def push():
        try:
            for i in range(TOTAL):
                session.pipe.wireguard.send(b"\x04\x00\x00\x00" + struct.pack("!I", i) + bytes((i * 7919) % 1400))
        except OSError:  # the reader below reports what went wrong
            pass

    pusher = threading.Thread(target=push)
    pusher.start()
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
                    partial += event.data
                    if event.message_finished:
                        received.append(struct.unpack("!I", partial[4:8])[0])
                        partial = bytearray()
                elif isinstance(event, CloseConnection):
                    errors.append("closed with %s" % event.code)
            if errors:
                break
    except (LocalProtocolError, RemoteProtocolError, OSError) as exc:
        errors.append(repr(exc))
    session.close()
    pusher.join(timeout=30)
    return len(received), received == list(range(len(received))), pings, errors


def _feed(client, sock):
    data = sock.recv(1 << 20)
    if not data:
        return None
    client.receive_data(data)
    return list(client.events())


if __name__ == "__main__":
    count, in_order, pings, errors = stress()
    print("frames=%d in_order=%s pings=%d errors=%s" % (count, in_order, pings, errors[:1]))
