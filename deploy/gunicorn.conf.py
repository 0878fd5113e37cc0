"""gunicorn settings for one orbmesh-api@PORT instance (deploy/systemd/orbmesh-api@.service).

One gevent worker per instance: a single gevent worker serves thousands of
connections, and the HTTP tunnel's sessions live in one process (README,
"Tunnel transports"), so more cores means more instances on more ports, with
nginx hashing each device onto one of them (deploy/nginx/orbmesh.conf).

    ORBMESH_BIND=127.0.0.1:8081 gunicorn -c deploy/gunicorn.conf.py 'app:create_app()'

Settings read from the environment:
    ORBMESH_BIND               listen address (default 127.0.0.1:8081)
    ORBMESH_GRACEFUL_TIMEOUT   seconds a stopping worker gets to finish (default 10)
    PROMETHEUS_MULTIPROC_DIR   set by the unit (a fresh RuntimeDirectory per start);
                               the child_exit hook below cleans a dead worker's files
"""
import os

bind = os.environ.get("ORBMESH_BIND", "") or "127.0.0.1:8081"
worker_class = "gevent"
workers = 1
# Open HTTP requests per worker, parked tunnel long polls included.  A
# WebSocket tunnel leaves this count once upgraded (app/tunnel/routes.py runs it
# outside the request); sessions are bounded per device by
# ORBMESH_TUNNEL_MAX_SESSIONS and in all by LimitNOFILE (one or two descriptors each).
worker_connections = 10000
# No preload: each worker starts its own reconcile watcher (a thread and a
# helper connection) after the fork; preloading would start it in the master.
preload_app = False
graceful_timeout = int(os.environ.get("ORBMESH_GRACEFUL_TIMEOUT", "") or "10")
# Request lines up to gunicorn's largest (8190 bytes), as nginx's default buffers (8k) pass them: a long
# query then reaches the app, which answers 400 in the API's envelope instead of gunicorn's HTML 414.
limit_request_line = 8190
# gevent workers heartbeat from their own loop; 30 s is gunicorn's default.
timeout = 30
# Longer than nginx's upstream keepalive_timeout (60 s) so that gunicorn never
# closes an idle keep-alive connection nginx is about to reuse.
keepalive = 75
# The app logs every request itself; gunicorn's own messages go to stderr (the journal).
accesslog = None
errorlog = "-"
# No control socket (gunicorn 27+): nothing manages the instance through it,
# and under ProtectHome/ProtectSystem its default path is not writable anyway.
# Older gunicorn versions ignore the unknown name.
control_socket_disable = True
# Only nginx on loopback talks to gunicorn; trust its X-Forwarded-Proto.
forwarded_allow_ips = "127.0.0.1,::1"


def child_exit(server, worker):
    """Prometheus multiprocess: drop the dead worker's live-gauge files.

    The metrics module belongs to the app; when it is not there (or metrics
    are off) this hook does nothing.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    try:
        from app.ops.metrics import child_exit as metrics_child_exit
    except ImportError:
        return
    metrics_child_exit(server, worker)
