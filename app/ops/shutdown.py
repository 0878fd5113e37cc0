"""A stopping worker ends its tunnel sessions at once.

gunicorn stops a worker with SIGTERM (a restart, or the old workers of a
reload) and waits up to its graceful timeout for open requests.  A WebSocket
tunnel or a parked HTTP poll would hold the worker for all of it, and the
HTTP tunnel cannot even send meanwhile: a stopping worker closes each
keep-alive connection after its response and no longer accepts.  So on
SIGTERM every tracked session is closed: the worker exits as soon as its API
requests are done, the next worker starts sooner, and the client's relay
(orbmesh_relay) reconnects to it; a tunnel request that still reaches the
stopping worker gets 503 SERVER_STOPPING.  The WireGuard session behind the tunnel
goes on: the server sees the client's datagrams come from the new session's
UDP socket and follows it (docs/operations.md, "What survives what").
"""
import logging
import signal
import threading
import weakref

from ..failures import ServerStopping

log = logging.getLogger(__name__)

_sessions = weakref.WeakSet()
_stopping = threading.Event()
_installed = []


def track(session):
    """Close `session` (its close()) when this worker is told to stop; returns it."""
    _sessions.add(session)
    if _stopping.is_set():  # started as the worker was told to stop
        close_all()
    return session


def refuse_new():
    """Before a tunnel request: none starts on a stopping worker (the relay retries, reaching the next)."""
    if _stopping.is_set():
        raise ServerStopping("This server is restarting; connect again")


def close_all():
    sessions = list(_sessions)
    for session in sessions:
        try:
            session.close()
        except Exception:  # already closed, or closing as we speak
            pass
    log.info("stopping: closed %d tunnel sessions", len(sessions))


def _close_when_stopping():
    _stopping.wait()
    close_all()


def init_app(app):
    """Chain onto the worker's SIGTERM handler (gunicorn's); elsewhere (tests, the CLI) do nothing."""
    previous = signal.getsignal(signal.SIGTERM)
    if _installed or not callable(previous):
        return

    def on_term(signum, frame):
        previous(signum, frame)
        _stopping.set()  # a thread closes them: under gevent a signal handler must not block

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: no signals to chain
        return
    threading.Thread(target=_close_when_stopping, name="tunnel-close", daemon=True).start()
    _installed.append(on_term)
