"""OrbMesh WireGuard node: the unprivileged API.

gunicorn -k gevent 'app:create_app()'
"""
from flask import Flask

from . import config as settings
from . import helper
from .api import auth, errors, metrics_view, openapi, probe, ratelimit, usage_view, wireguard
from .bridge import bridges, exits, smartconnect
from .dns import resolver
from .ops import health, logs, shutdown
from .peers import audit, db, reconcile, usage
from .peers.allocator import Allocator
from .tunnel import routes


def create_app(test_config=None):
    """Build the app: defaults, then ORBMESH_CONFIG_FILE, then ORBMESH_* variables, then test_config."""
    app = Flask(__name__)
    values = settings.load(overrides=test_config)
    settings.check_secrets(values)
    app.config.update(values)
    app.config.update({k: v for k, v in (test_config or {}).items() if k not in settings.SETTINGS})
    app.config["MAX_CONTENT_LENGTH"] = values["MAX_BODY_BYTES"]
    app.json.sort_keys = False
    logs.configure(values["LOG_LEVEL"], values["LOG_FORMAT"])

    logs.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    db.init_app(app)
    helper.init_app(app)
    audit.init_app(app)
    ratelimit.init_app(app)
    app.extensions["orbmesh_allocator"] = Allocator(values["POOL"], values["GATEWAY"])
    exits.init_app(app)
    smartconnect.init_app(app)
    bridges.init_app(app)

    app.register_blueprint(wireguard.bp)
    app.register_blueprint(usage_view.bp)
    usage.init_app(app)
    app.register_blueprint(routes.bp)
    routes.init_app(app)
    probe.init_app(app)
    resolver.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(metrics_view.bp)
    reconcile.init_app(app)
    shutdown.init_app(app)
    return app
